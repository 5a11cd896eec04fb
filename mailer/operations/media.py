"""Images and Word documents brought into an edition from the console: checked, cleaned and
stored by the library (`mailer.media`, `mailer.wordimport`), recorded here."""

from __future__ import annotations

from sqlalchemy.orm import Session

from mailer import media, wordimport
from mailer.accounts import Permission
from mailer.config import Settings
from mailer.operations import Caller


def upload_image(session: Session, caller: Caller, settings: Settings, data: bytes,
                 alt: str, filename: str) -> media.StoredImage:
    """An image for an edition: re-encoded without its metadata and stored by content hash.
    Raises `MediaError` saying why it is refused (nothing stored then)."""
    caller.require(Permission.EDITIONS_EDIT)
    stored = media.store_image(settings, data, alt, where=filename or "the image")
    caller.record(session, "media.upload", f"media:{stored.name}", alt=stored.alt,
                  file=(filename or "")[:120], width=stored.width, height=stored.height)
    return stored


def import_word(session: Session, caller: Caller, settings: Settings, data: bytes,
                filename: str, details: wordimport.Details) -> wordimport.ImportResult:
    """A Word document as edition source (not stored as an edition until the author saves).
    Raises `WordImportError` for a refused file (nothing stored then)."""
    caller.require(Permission.EDITIONS_EDIT)
    result = wordimport.import_docx(data, settings, name=filename or "document.docx",
                                    details=details)
    caller.record(session, "edition.import_word", None, file=(filename or "")[:120],
                  problems=len(result.problems), images=len(result.media))
    return result
