"""`mailer web`: serve the recipient pages with uvicorn."""

from __future__ import annotations

import typer

from mailer.cli.runtime import Runtime, console


def web(ctx: typer.Context,
        host: str = typer.Option("127.0.0.1", help="Address to listen on"),
        port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on"),
        workers: int = typer.Option(1, min=1, help="Worker processes")) -> None:
    """Serve the subscribe, confirm, unsubscribe, preferences and archive pages.

    Example: `mailer web --host 0.0.0.0 --port 8000`. Links in mail are built from the
    base_url setting, not from the address served on; put HTTPS in front of it in production.
    """
    import uvicorn

    from mailer.web.app import create_app

    rt: Runtime = ctx.obj
    app = create_app(rt.settings)  # checks the schema before listening
    console.print(f"serving {rt.settings.base_url} on http://{host}:{port}")
    if workers > 1:
        # uvicorn's multi-process mode needs an import string; the factory reads the settings.
        uvicorn.run("mailer.web.app:app_from_environment", factory=True, host=host, port=port,
                    workers=workers, proxy_headers=True, server_header=False, log_level="warning")
        return
    uvicorn.run(app, host=host, port=port, proxy_headers=True, server_header=False,
                log_level="warning")
