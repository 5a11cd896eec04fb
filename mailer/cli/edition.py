"""`mailer edition`: validate, preview and screenshot editions."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import typer
from rich.markup import escape

from mailer.cli.runtime import Runtime, console
from mailer.config import Settings
from mailer.edition import load_edition
from mailer.errors import MailerError
from mailer.reference import message_id
from mailer.render import (
    CompiledEdition,
    Recipient,
    RecipientUrls,
    build_message,
    compile_edition,
    personalise,
)

app = typer.Typer(help="Write, check and preview editions.", no_args_is_help=True)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WIDTHS = (375, 600)


def _compile(settings: Settings, file: Path) -> CompiledEdition:
    compiled = compile_edition(load_edition(file), settings)
    for warning in compiled.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    return compiled


def _preview_urls(settings: Settings, stem: str) -> RecipientUrls:
    # Not real tokens: a preview must never carry a link that acts for a subscriber.
    base = settings.base_url
    return RecipientUrls(unsubscribe=f"{base}/unsubscribe/preview",
                         preferences=f"{base}/preferences/preview",
                         view_online=f"{base}/archive/{stem}")


def _preview_dir(settings: Settings) -> Path:
    folder = settings.var_dir / "preview"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@app.command()
def validate(ctx: typer.Context,
             file: Path = typer.Argument(..., help="The edition source")) -> None:
    """Check an edition and list every problem with its line, and the preflight warnings.

    Example: `mailer edition validate editions/2020-q3-kent-essex.md`
    """
    rt: Runtime = ctx.obj
    edition = load_edition(file)
    compiled = _compile(rt.settings, file)
    console.print(f"[green]ok:[/] {escape(str(file))}: {len(edition.sections)} sections, "
                  f"{len(compiled.html.encode()) / 1024:.0f} KB HTML, "
                  f"{len(compiled.warnings)} warning(s)")


@app.command()
def preview(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="The edition source"),
    to: str | None = typer.Option(None, "--to", help="Also send the preview to this address"),
    open_it: bool = typer.Option(False, "--open", help="Open the HTML in a browser"),
) -> None:
    """Write the edition as .html, .txt and .eml under <var_dir>/preview/, as one reader sees it.

    Example: `mailer edition preview editions/2020-q3-kent-essex.md --to me@example.org`
    """
    rt: Runtime = ctx.obj
    settings = rt.settings
    compiled = _compile(settings, file)
    urls = _preview_urls(settings, file.stem)
    reader = Recipient(email=to or settings.from_address, name="Preview Reader")
    page = personalise(compiled, reader, urls)
    domain = settings.from_address.rpartition("@")[2]
    data = build_message(compiled, reader, urls,
                         message_id=message_id(settings.secret(), 0, 0, domain))
    folder = _preview_dir(settings)
    paths = {ext: folder / f"{file.stem}.{ext}" for ext in ("html", "txt", "eml")}
    paths["html"].write_text(page.html, encoding="utf-8")
    paths["txt"].write_text(page.text, encoding="utf-8")
    paths["eml"].write_bytes(data)
    for path in paths.values():
        console.print(f"wrote {escape(str(path))}")
    if to:
        from mailer.outgoing import send_now
        from mailer.smtp import Outcome

        result = send_now(settings, to, data)
        if result.outcome != Outcome.SENT:
            console.print(f"[red]not sent[/] to {escape(to)}: {result.outcome} "
                          f"{escape(result.reply)}")
            raise typer.Exit(1)
        console.print(f"[green]sent[/] to {escape(to)}: {escape(result.reply)}")
    if open_it:
        webbrowser.open(paths["html"].resolve().as_uri())


@app.command()
def screenshot(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="The edition source"),
    chromium: Path = typer.Option(Path(CHROMIUM), help="Debian's chromium binary"),
) -> None:
    """Write 375 px (phone) and 600 px (desk) full-page PNGs under <var_dir>/preview/.

    Example: `mailer edition screenshot editions/2020-q3-kent-essex.md`
    """
    rt: Runtime = ctx.obj
    settings = rt.settings
    if not chromium.exists():
        raise MailerError(f"no chromium at {chromium}",
                          hint="apt-get install chromium (never `playwright install`)")
    compiled = _compile(settings, file)
    page_html = personalise(compiled, Recipient(settings.from_address, "Preview Reader"),
                            _preview_urls(settings, file.stem)).html
    folder = _preview_dir(settings)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            for width in WIDTHS:
                page = browser.new_page(viewport={"width": width, "height": 800})
                # Offline, as a mail client is: any remote fetch is refused, not waited for.
                page.route("**/*", lambda route: route.abort()
                           if not route.request.url.startswith(("about:", "data:"))
                           else route.continue_())
                page.set_content(page_html, wait_until="load")
                path = folder / f"{file.stem}-{width}.png"
                page.screenshot(path=str(path), full_page=True)
                page.close()
                console.print(f"wrote {escape(str(path))}")
        finally:
            browser.close()
