"""`mailer edition`: validate, preview and screenshot editions."""

from __future__ import annotations

import webbrowser
from email.utils import make_msgid
from pathlib import Path

import typer
from rich.markup import escape
from sqlalchemy.orm import Session

from mailer import audience
from mailer.cli.runtime import Runtime, console, err_console
from mailer.config import Settings
from mailer.edition import load_edition
from mailer.errors import MailerError
from mailer.links import Links
from mailer.models import Edition
from mailer.operations import editions as edition_ops
from mailer.render import (
    CompiledEdition,
    Recipient,
    build_message,
    compile_edition,
    personalise,
)

app = typer.Typer(help="Write, check and preview editions.", no_args_is_help=True)


def edition_of(rt: Runtime, session: Session, ident: str) -> Edition:
    """An edition named by id or slug, or an edition file (.md), which is stored first."""
    path = Path(ident)
    if path.suffix == ".md" or path.is_file():
        if not path.is_file():
            raise MailerError(f"no edition file {ident}")
        return edition_ops.save_file(session, rt.caller, rt.settings, path)[0]
    return edition_ops.get(session, rt.caller, ident)

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
    known, unchecked = audience.known_without_session(rt.settings)
    audience.check(edition, known)
    if unchecked:
        console.print(f"[yellow]note:[/] the topic was not checked: {escape(unchecked)}")
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
    urls = Links(settings).preview(file.stem)
    reader = Recipient(email=to or settings.from_address, name="Preview Reader")
    page = personalise(compiled, reader, urls)
    domain = settings.from_address.rpartition("@")[2]
    # Not our delivery reference (signed with the install's key): a preview is no delivery,
    # and previewing needs no key, so none is made in whatever directory this runs in.
    data = build_message(compiled, reader, urls, message_id=make_msgid("preview", domain))
    folder = _preview_dir(settings)
    paths = {ext: folder / f"{file.stem}.{ext}" for ext in ("html", "txt", "eml")}
    paths["html"].write_text(page.html, encoding="utf-8")
    paths["txt"].write_text(page.text, encoding="utf-8")
    paths["eml"].write_bytes(data)
    for path in paths.values():
        console.print(f"wrote {escape(str(path))}")
    if to:
        from mailer.outgoing import not_sent, send_now
        from mailer.smtp import Outcome

        result = send_now(settings, to, data)
        if result.outcome != Outcome.SENT:
            raise not_sent(settings, result)
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
                            Links(settings).preview(file.stem)).html
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


@app.command("import")
def import_word(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="The Word document (.docx)"),
    output: Path | None = typer.Option(None, "-o", "--output",
                                       help="Write the edition source here (default: print it)"),
    title: str | None = typer.Option(None, help="The title, when the document has none"),
    issue: int | None = typer.Option(None, min=1, help="The issue number, when it has none"),
    date: str | None = typer.Option(None, help="The date (YYYY-MM-DD), when it has none"),
    subject: str | None = typer.Option(None, help="The subject line (default: title, issue)"),
    preheader: str | None = typer.Option(None, help="The inbox preview line"),
) -> None:
    """Turn a Word document into an edition source; its pictures go into the media store.

    Each problem is named by where it is in the Word document; the exit code is 1 while there
    are any. A .doc, .docm, password-protected, damaged or oversized file is refused and
    nothing is stored. Example: `mailer edition import issue3.docx -o editions/issue3.md`
    """
    import datetime as dt

    from mailer.wordimport import Details, import_docx

    rt: Runtime = ctx.obj
    try:
        day = dt.date.fromisoformat(date) if date else None
    except ValueError:
        raise MailerError(f"--date {date!r} is not a date", hint="write it as YYYY-MM-DD") from None
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise MailerError(f"cannot read {file}: {exc.strerror}") from None
    result = import_docx(data, rt.settings, name=file.name,
                         details=Details(title=title, issue=issue, date=day, subject=subject,
                                         preheader=preheader))
    if output is None:
        print(result.source, end="")
    else:
        output.write_text(result.source, encoding="utf-8")
        console.print(f"wrote {escape(str(output))}")
    status = console if output is not None else err_console  # stdout holds the source
    for image in result.media:
        status.print(f"stored picture {escape(image.url)} ({image.width} x {image.height})")
    for problem in result.problems:
        err_console.print(f"[yellow]to fix:[/] {escape(str(problem))}")
    if result.problems:
        err_console.print(f"{len(result.problems)} problem(s) to fix in the Word document "
                          "(or in the source) before the edition validates")
        raise typer.Exit(1)
