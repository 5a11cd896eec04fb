"""The media store: images for editions, checked, cleaned and kept under their content hash.

`prepare_image` is pure: it refuses anything that is not really a PNG, JPEG, GIF or WebP (it
looks at the bytes, never the name), SVG, decompression bombs and files over 10 MB, and it
re-encodes what it accepts with Pillow. Re-encoding writes only the pixels, so EXIF (camera,
time, GPS position: photographs taken by police officers) and every other metadata chunk are
gone, and an image wider than twice the email column is scaled down to that. `save_image`
writes the result as `<sha256>.<ext>` under the media folder; the same image saved twice is one
file. The web app serves the folder at `/media/` (`mailer.web.media`), so a media URL is
absolute under the base URL and never changes.

No database: an image is named by its content, and the edition source that shows it carries
its alt text.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailer.config import Settings
from mailer.edition import COLUMN_WIDTH
from mailer.errors import MailerError

MAX_BYTES = 10 * 1024 * 1024
# Twice the email column: sharp on high-density screens, and no bigger than that needs.
MAX_WIDTH = 2 * COLUMN_WIDTH
MAX_FRAMES = 100  # an animation's frames are all decoded at once
URL_PATH = "/media/"
# Pillow format -> (file extension, content type). Nothing else is opened.
FORMATS = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg"),
           "GIF": ("gif", "image/gif"), "WEBP": ("webp", "image/webp")}
CONTENT_TYPES = {ext: content_type for ext, content_type in FORMATS.values()}
NAME = re.compile(r"^([0-9a-f]{64})\.(png|jpg|gif|webp)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


class MediaError(MailerError):
    """An image that cannot go in an edition; the message says why."""


@dataclass(frozen=True)
class PreparedImage:
    """A re-encoded image, ready to store: only pixels, no metadata."""

    data: bytes
    ext: str
    width: int
    height: int
    alt: str

    @property
    def name(self) -> str:
        return f"{hashlib.sha256(self.data).hexdigest()}.{self.ext}"

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.ext]


@dataclass(frozen=True)
class StoredImage:
    name: str  # <sha256>.<ext>
    url: str  # absolute, under the base URL
    width: int
    height: int
    alt: str


def media_dir(settings: Settings) -> Path:
    return settings.media_dir or settings.var_dir / "media"


def media_url(settings: Settings, name: str) -> str:
    return f"{settings.base_url}{URL_PATH}{name}"


def check_alt(alt: str | None) -> str:
    """The alt text, stripped; refused when empty or not one line."""
    text = (alt or "").strip()
    if not text:
        raise MediaError("an image needs alt text: say in a few words what it shows",
                         hint="screen readers read it, and mail clients that block images "
                              "show it instead")
    if _CONTROL.search(text):
        raise MediaError("the alt text must be one line (no line breaks or control characters)")
    return text


def prepare_image(data: bytes, alt: str | None, *, where: str = "the image",
                  require_alt: bool = True) -> PreparedImage:
    """Check and re-encode an uploaded image. Raises MediaError saying why it is refused.

    `require_alt=False` is for images taken from a document, where a missing alt text is
    the edition's problem to report (with the place it is in), not a reason to drop it."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    alt_text = check_alt(alt) if require_alt or (alt or "").strip() else ""
    if len(data) > MAX_BYTES:
        raise MediaError(f"{where} is {len(data) / 1024 / 1024:.1f} MB; "
                         f"the limit is {MAX_BYTES // 1024 // 1024} MB",
                         hint="save it smaller (1200 pixels wide is plenty) and try again")
    head = data[:1024].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg", b"<!doctype svg")) or b"<svg" in head:
        raise MediaError(f"{where} is an SVG drawing, which can carry scripts: "
                         "send a PNG, JPEG, GIF or WebP instead")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: make it an error
            # (a 90-megapixel image is 360 MB decoded, and no newsletter needs one).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
                fmt = image.format or ""
                width, height = image.size
                count = int(getattr(image, "n_frames", 1))
                if count > MAX_FRAMES:
                    raise MediaError(f"{where} is an animation of {count} frames; "
                                     f"the limit is {MAX_FRAMES}")
                frames = [_pixels_only(frame) for frame in ImageSequence.Iterator(image)]
                durations = [int(frame.info.get("duration", 100)) for frame in frames]
                loop = int(image.info.get("loop", 0))
    except (UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise MediaError(f"{where} is not a PNG, JPEG, GIF or WebP image "
                             "(judged by its content, not its name)") from None
        raise MediaError(f"{where} has more pixels than Pillow's safety limit "
                         f"({Image.MAX_IMAGE_PIXELS:,}): refused as a possible decompression "
                         "bomb", hint="scale it down and try again") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"{where} is damaged and cannot be read: {exc}") from None

    ext = FORMATS[fmt][0]
    scale = min(1.0, MAX_WIDTH / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1:
        frames = [frame.resize(size, Image.Resampling.LANCZOS) for frame in frames]
    out = io.BytesIO()
    first = frames[0]
    timing = durations if len(frames) > 1 else durations[0]
    # Nothing but pixels (and GIF timing) is passed on: no exif=, icc_profile= or text chunks.
    if fmt == "JPEG":
        first.convert("RGB").save(out, "JPEG", quality=85, optimize=True)
    elif fmt == "PNG":
        first.save(out, "PNG", optimize=True)
    elif fmt == "GIF":
        first.save(out, "GIF", save_all=len(frames) > 1, append_images=frames[1:],
                   duration=timing, loop=loop)
    else:
        first.save(out, "WEBP", quality=85, save_all=len(frames) > 1,
                   append_images=frames[1:], duration=timing, loop=loop)
    return PreparedImage(data=out.getvalue(), ext=ext, width=size[0], height=size[1],
                         alt=alt_text)


def _pixels_only(frame: PILImage) -> PILImage:
    """An upright copy of the frame that keeps no metadata but its palette transparency and
    timing (some encoders write `info["exif"]` back out unless it is removed)."""
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(frame.copy()) or frame.copy()
    upright.info = {key: frame.info[key] for key in ("transparency", "duration", "background")
                    if key in frame.info}
    return upright


def save_image(settings: Settings, prepared: PreparedImage) -> StoredImage:
    """Write a prepared image to the media folder under its content hash (atomically)."""
    folder = media_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / prepared.name
    if not target.exists():
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(prepared.data)
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return StoredImage(name=prepared.name, url=media_url(settings, prepared.name),
                       width=prepared.width, height=prepared.height, alt=prepared.alt)


def store_image(settings: Settings, data: bytes, alt: str | None, *,
                where: str = "the image") -> StoredImage:
    """Check, clean and store one uploaded image. Example: `store_image(s, png, "A map")`."""
    return save_image(settings, prepare_image(data, alt, where=where))


def stored_path(settings: Settings, name: str) -> Path | None:
    """The file for a media name such as `<sha256>.png`, or None (also for any other name)."""
    if not NAME.match(name):
        return None
    path = media_dir(settings) / name
    return path if path.is_file() else None


def stored_size(settings: Settings, url: str) -> tuple[int, int] | None:
    """(width, height) of a stored image named by its media URL; None when it is not one."""
    prefix = settings.base_url + URL_PATH
    if not url.startswith(prefix):
        return None
    path = stored_path(settings, url[len(prefix):])
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.size
