"""The media store: only real PNG/JPEG/GIF/WebP images, re-encoded without metadata, scaled to
twice the email column, stored under their content hash and served with immutable caching."""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import ExifTags, Image

from mailer import media
from mailer.config import Settings
from mailer.edition import COLUMN_WIDTH, parse_edition
from mailer.render import TEXT_WIDTH, compile_edition
from mailer.web.app import create_app


@pytest.fixture
def conf(tmp_path: Path) -> Settings:
    return Settings(var_dir=tmp_path / "var", base_url="https://news.example.org",
                    secret_key="s" * 40, suppression_key="k" * 40,
                    database_url=f"sqlite:///{tmp_path / 'absent.db'}")


def stored(conf: Settings) -> list[str]:
    folder = media.media_dir(conf)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def picture(fmt: str, size: tuple[int, int] = (40, 30), **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(out, fmt, **save)
    return out.getvalue()


def jpeg_with_gps() -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PoliceCam"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (51.0, 16.0, 42.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (0.0, 31.0, 12.0)
    data = picture("JPEG", exif=exif)
    with Image.open(io.BytesIO(data)) as check:  # the fixture really carries a position
        assert check.getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
    return data


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that claims huge dimensions: what a decompression bomb looks like."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_jpeg_loses_its_gps_and_camera_exif_and_is_named_by_its_hash(conf: Settings) -> None:
    image = media.store_image(conf, jpeg_with_gps(), "Officers at a briefing")
    assert re.fullmatch(r"[0-9a-f]{64}\.jpg", image.name)
    assert image.url == f"https://news.example.org/media/{image.name}"
    data = (media.media_dir(conf) / image.name).read_bytes()
    assert b"Exif" not in data and b"PoliceCam" not in data
    with Image.open(io.BytesIO(data)) as out:
        assert out.format == "JPEG" and dict(out.getexif()) == {}
        assert out.size == (40, 30) == (image.width, image.height)
    # The same picture again is the same file.
    assert media.store_image(conf, jpeg_with_gps(), "Again").name == image.name
    assert stored(conf) == [image.name]


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp")])
def test_each_accepted_format_keeps_its_format(conf: Settings, fmt: str, ext: str) -> None:
    image = media.store_image(conf, picture(fmt), "A red square")
    assert image.name.endswith(f".{ext}")
    with Image.open(media.media_dir(conf) / image.name) as out:
        assert out.format == fmt


def test_a_wide_image_is_scaled_to_twice_the_column(conf: Settings) -> None:
    image = media.store_image(conf, picture("PNG", (3000, 1000)), "A wide banner")
    assert (image.width, image.height) == (2 * COLUMN_WIDTH, 400) == (1200, 400)
    small = media.store_image(conf, picture("PNG", (300, 200)), "A small one")
    assert (small.width, small.height) == (300, 200), "small images are not enlarged"


REFUSED = [
    ("text named .png", b"just some text, not an image\n" * 4, "not a PNG, JPEG, GIF or WebP"),
    ("svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)'
            b"</script></svg>", "SVG drawing"),
    ("bmp", picture("BMP"), "not a PNG, JPEG, GIF or WebP"),
    ("bomb", png_header_only(20_000, 20_000), "decompression bomb"),
    ("bomb just over the limit", png_header_only(10_000, 10_000), "decompression bomb"),
    ("truncated", picture("PNG", (400, 300))[:200], "damaged"),
    ("over 10 MB", b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024), "the limit is 10 MB"),
]


@pytest.mark.parametrize(("data", "why"), [(d, w) for _, d, w in REFUSED],
                         ids=[n for n, _, _ in REFUSED])
def test_what_is_not_a_real_small_image_is_refused_and_nothing_stored(
        conf: Settings, data: bytes, why: str) -> None:
    with pytest.raises(media.MediaError, match=why):
        media.store_image(conf, data, "Some alt text", where="upload.png")
    assert stored(conf) == []


@pytest.mark.parametrize("alt", [None, "", "   ", "two\nlines"])
def test_alt_text_is_required_and_one_line(conf: Settings, alt: str | None) -> None:
    with pytest.raises(media.MediaError, match="alt text"):
        media.store_image(conf, picture("PNG"), alt)
    assert stored(conf) == []


@pytest.fixture
def app_client(conf: Settings, tmp_path: Path) -> Iterator[TestClient]:
    from mailer.migrations import upgrade

    upgrade(conf.database)
    with TestClient(create_app(conf), base_url="https://news.example.org") as client:
        yield client


def test_the_web_app_serves_a_stored_image_immutable_and_without_exif(
        conf: Settings, app_client: TestClient) -> None:
    image = media.store_image(conf, jpeg_with_gps(), "Officers at a briefing")
    response = app_client.get(f"/media/{image.name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert b"Exif" not in response.content and b"PoliceCam" not in response.content
    for name in (image.name.replace(".jpg", ".png"), "../mailer.db", "x" * 64 + ".jpg",
                 image.name.upper()):
        assert app_client.get(f"/media/{name}").status_code == 404, name


def test_an_edition_image_from_the_store_gets_width_height_and_alt(conf: Settings) -> None:
    wide = media.store_image(conf, picture("PNG", (2400, 1200)), "Map of Kent divisions")
    small = media.store_image(conf, picture("PNG", (200, 100)), "Small badge")
    source = (f"---\ntitle: T\nissue: 1\ndate: 2024-03-01\nsubject: S\ntopic: newsletter\n"
              f"images:\n  - src: {small.url}\n    alt: Small badge\n---\n\n"
              f"## Map\n\n![Map of Kent divisions]({wide.url})\n")
    compiled = compile_edition(parse_edition(source, "t.md"), conf)
    img = re.search(r'<img\b[^>]*alt="Map of Kent divisions"[^>]*>', compiled.html)
    assert img, compiled.html
    assert f'width="{TEXT_WIDTH}"' in img[0] and f'height="{TEXT_WIDTH // 2}"' in img[0]
    # Shown on a phone as on a desk: the height is an attribute, the CSS height stays auto.
    assert re.search(r'style="[^"]*height: ?auto', img[0]) and "max-width:100%" in img[0]
    badge = re.search(r'<img\b[^>]*alt="Small badge"[^>]*>', compiled.html)
    assert badge, "the front-matter image keeps its alt text"
    assert "[image: Map of Kent divisions]" in compiled.text
    assert "[image: Small badge]" in compiled.text
