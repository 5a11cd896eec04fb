"""The sample edition in headless Chromium: fits every width, every section shows, text is
readable (size and contrast, light and dark), and the figures stack to one column on a phone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailer.config import Settings
from mailer.edition import load_edition
from mailer.render import Recipient, RecipientUrls, compile_edition, personalise

pytestmark = pytest.mark.browser

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
SECTIONS = [
    "Who are Protect & Prevent?", "Modern Slavery & Human Trafficking", "MSHT dates of interest",
    "Kent picture", "Operation Aidant – What is it?",
    "Consultation on research priorities for the Modern Slavery PEC", "Useful links",
    "Trends & Intelligence Gaps",
]
# Phrases from the seed that must be on the page: the introduction, the exploitation summary,
# the dates and the figures, the sub-headings of the last section, and the footer.
PHRASES = [
    "The document focus is to raise awareness", "Criminal exploitation is showing the highest",
    "World Anti-Slavery Day", "Kent Police NRM", "150", "Intelligence Gaps",
    "More intelligence required around the threat of child trafficking",
    "You are getting this email because", "Unsubscribe", "Change your preferences",
]

CONTRAST_JS = """
() => {
  const parse = c => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = el => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const out = [];
  // Only elements that carry text themselves: MJML's layout cells are font-size 0 on purpose.
  const ownText = el => [...el.childNodes].some(n => n.nodeType === 3 && n.data.trim());
  for (const el of document.querySelectorAll('p, li, td, th, h1, h2, h3, a, div, span')) {
    if (!ownText(el) || el.offsetParent === null) continue;
    const fg = lum(parse(getComputedStyle(el).color).slice(0, 3));
    const bg = lum(background(el));
    const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
    out.push({text: el.innerText.slice(0, 40), ratio,
              size: parseFloat(getComputedStyle(el).fontSize), tag: el.tagName});
  }
  return out;
}
"""


@pytest.fixture(scope="module")
def page_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    settings = Settings(var_dir=tmp_path_factory.mktemp("var"),
                        base_url="https://news.example.org", secret_key="s" * 40,
                        suppression_key="k" * 40)
    compiled = compile_edition(load_edition(SAMPLE), settings)
    urls = RecipientUrls("https://news.example.org/u/tok", "https://news.example.org/p/tok",
                         "https://news.example.org/archive/2020-q3")
    return personalise(compiled, Recipient("r@example.org", "Ann"), urls).html


@pytest.fixture
def open_page(browser: Any, page_html: str) -> Iterator[Any]:
    pages: list[Any] = []

    def opener(width: int, scheme: str = "light") -> Any:
        context = browser.new_context(viewport={"width": width, "height": 900},
                                      color_scheme=scheme)
        page = context.new_page()
        # Offline, like a mail client that blocks remote content: nothing may be fetched.
        page.route("**/*", lambda route: route.abort())
        page.set_content(page_html, wait_until="load")
        pages.append(context)
        return page

    yield opener
    for context in pages:
        context.close()


@pytest.mark.parametrize("width", [320, 375, 600, 1024])
def test_sample_fits_the_width_shows_every_section_and_is_readable(
        open_page: Any, artifacts: Path, width: int) -> None:
    page = open_page(width)
    page.screenshot(path=str(artifacts / f"edition-2020-q3-{width}.png"), full_page=True)
    scroll = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll[0] <= scroll[1], f"horizontal scrolling at {width}px: {scroll}"
    assert page.evaluate("document.compatMode") == "CSS1Compat", "quirks mode: doctype lost"
    assert page.evaluate("document.documentElement.lang") == "en-GB"
    headings = page.eval_on_selector_all("h2", "els => els.map(e => e.innerText.trim())")
    assert headings == SECTIONS
    assert page.eval_on_selector_all("h1", "els => els.length") == 1
    body_text = page.inner_text("body")
    for phrase in PHRASES:
        assert phrase in body_text, phrase
    measured = page.evaluate(CONTRAST_JS)
    assert len(measured) > 40
    small = [m for m in measured if m["size"] < 14]
    assert not small, small
    body = [m for m in measured if m["tag"] in ("P", "LI") and "footer" not in m["text"]]
    assert min(m["size"] for m in body if m["text"].startswith(("Role of", "Welcome"))) >= 16
    low = [m for m in measured if m["ratio"] < 4.5]
    assert not low, low
    content_width = page.evaluate(
        "Math.max(...[...document.querySelectorAll('h2')].map(h => h.parentElement"
        ".getBoundingClientRect().width))")
    assert content_width <= min(width, 600), "content wider than 600px or the viewport"


def _figure_tables(page: Any) -> list[dict[str, float]]:
    return page.eval_on_selector_all(
        ".figures table", "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return {left: r.left, top: r.top, width: r.width}; })")


def test_figures_stack_to_one_column_under_480px(open_page: Any) -> None:
    phone = _figure_tables(open_page(375))
    desk = _figure_tables(open_page(600))
    assert len(phone) == len(desk) == 2
    assert phone[1]["top"] > phone[0]["top"] and abs(phone[1]["left"] - phone[0]["left"]) < 1
    assert abs(desk[1]["top"] - desk[0]["top"]) < 1 and desk[1]["left"] > desk[0]["left"]


TEXT_BOXES_JS = """
phrases => phrases.map(phrase => {
  const el = [...document.querySelectorAll('p, h2, .dates table')]
    .find(e => e.innerText.trim().startsWith(phrase));
  if (!el) return null;
  const r = el.getBoundingClientRect();
  return {phrase, left: r.left, right: window.innerWidth - r.right, width: r.width};
})
"""


@pytest.mark.parametrize(("width", "inset"), [(375, 16), (600, 24)])
def test_text_is_inset_16px_on_a_phone_and_24px_on_a_desk(open_page: Any, width: int,
                                                           inset: int) -> None:
    # One padding rule on the cell that holds the text, not on every nested layout cell
    # (three of them on a phone gave 48 px each side and a 279 px text column at 375 px).
    page = open_page(width)
    boxes = page.evaluate(TEXT_BOXES_JS, ["The document focus", "Role of the Modern Slavery",
                                          "MSHT dates of interest", "14 September",
                                          "Useful links"])
    assert None not in boxes, boxes
    for box in boxes:
        assert (round(box["left"]), round(box["right"])) == (inset, inset), box
        assert round(box["width"]) == width - 2 * inset, box


def test_dark_mode_keeps_text_readable(open_page: Any, artifacts: Path) -> None:
    page = open_page(375, "dark")
    page.screenshot(path=str(artifacts / "edition-2020-q3-375-dark.png"), full_page=True)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 20, 24)"
    low = [m for m in page.evaluate(CONTRAST_JS) if m["ratio"] < 4.5]
    assert not low, low


def test_cli_screenshot_writes_375_and_600_px_pngs(browser: Any, tmp_path: Path) -> None:
    # `browser` only for its skip-or-fail rule. The command runs in its own process: a second
    # Playwright sync session cannot start inside this one's event loop.
    import os
    import struct
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MAILER_") or k.startswith("MAILER_TEST_")}
    env.update(MAILER_CONFIG=str(tmp_path / "absent.toml"), MAILER_VAR_DIR=str(tmp_path / "var"),
               MAILER_SECRET_KEY="s" * 40)
    done = subprocess.run([sys.executable, "-m", "mailer", "edition", "screenshot", str(SAMPLE)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for width in (375, 600):
        png = (tmp_path / "var" / "preview" / f"{SAMPLE.stem}-{width}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        shot_width, shot_height = struct.unpack(">II", png[16:24])
        assert shot_width == width and shot_height > 2000, "a full page, not one screen"
