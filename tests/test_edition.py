"""Edition source: the sample validates; every kind of mistake is named with its file and line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from mailer.edition import EditionErrors, Table, link_problem, load_edition, parse_edition
from mailer.errors import EditionError

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
CASES = Path(__file__).resolve().parent / "edition_cases"

GOOD_FRONT = """---
title: Test bulletin
issue: 1
date: 2024-03-01
subject: Test subject
preheader: A test
topic: newsletter
---
"""


def problems(text: str) -> list[str]:
    with pytest.raises(EditionError) as info:
        parse_edition(text, "ed.md")
    errors = getattr(info.value, "errors", [info.value])
    return [str(e) for e in errors]


def test_sample_edition_validates_with_every_section() -> None:
    edition = load_edition(SAMPLE)
    assert edition.meta.issue == 2
    assert edition.meta.date == dt.date(2020, 9, 1)
    assert edition.meta.audience.regions == ["kent", "essex"]
    titles = [s.title for s in edition.sections]
    assert titles == [
        "Who are Protect & Prevent?",
        "Modern Slavery & Human Trafficking",
        "MSHT dates of interest",
        "Kent picture",
        "Operation Aidant – What is it?",
        "Consultation on research priorities for the Modern Slavery PEC",
        "Useful links",
        "Trends & Intelligence Gaps",
    ]
    kinds = {s.title: s.kind for s in edition.sections}
    assert kinds["MSHT dates of interest"] == "dates"
    assert kinds["Useful links"] == "links"
    figures = next(s for s in edition.sections if s.kind == "figures")
    assert sum(isinstance(b, Table) for b in figures.blocks) == 2
    assert edition.intro, "the introduction is the text before the first section"


def test_sample_edition_has_no_placeholder_links_or_personal_address() -> None:
    edition = load_edition(SAMPLE)
    text = SAMPLE.read_text()
    assert "Jana.Sherrin" not in text
    assert "](#)" not in text
    hrefs = [href for _, href, _ in edition.links]
    assert len(hrefs) == 11
    assert all(h.startswith("https://example.org/") or h == "contact:" for h in hrefs)
    assert not any(text.strip().lower() in ("here", "click here")
                   for text, _, _ in edition.links)


@pytest.mark.parametrize(("body", "line", "fragment"), [
    ("Hello <b>there</b>.\n", 9, "raw HTML"),
    ("<div>block</div>\n", 9, "raw HTML"),
    ("See [this page](javascript:alert(1)).\n", 9, "javascript: links"),
    ("See [the page](/relative/path).\n", 9, "relative link"),
    ("See [the page]().\n", 9, "empty link target"),
    ("See [the page](#).\n", 9, "placeholder link"),
    ("See [the page](http://example.org/x).\n", 9, "insecure link"),
    ("Intro.\n\n![](https://example.org/a.png)\n", 11, "image without alt text"),
    ("Intro.\n\n# Title again\n\nText.\n", 11, "'#' heading is not allowed"),
    ("## Odd {.sidebar}\n\nText.\n", 9, "unknown section kind"),
    ("## Links {.links}\n\n- [A](https://example.org/a)\n- no link here\n", 12, "has no link"),
    ("## Figures {.figures}\n\nNo table.\n", 9, "has no table"),
    ("## Dates {.dates}\n\nNo list.\n", 9, "needs a bullet list"),
    ("Intro.\n\n| a | b |\n|---|---|\n| [x](#) | 1 |\n", 13, "placeholder link"),
])
def test_body_problem_names_file_and_line(body: str, line: int, fragment: str) -> None:
    found = problems(GOOD_FRONT + body)
    assert any(p.startswith(f"ed.md:{line}: ") and fragment in p for p in found), found


@pytest.mark.parametrize(("front", "line", "fragment"), [
    ("colour: red\n", 8, "unknown key 'colour'"),
    ("images:\n  - src: https://example.org/a.png\n    alt: ''\n", 10, "image without alt"),
    ("images:\n  - src: https://example.org/a.png\n", 9, "images.0.alt"),
    ("images:\n  - src: /a.png\n    alt: A logo\n", 9, "relative link"),
    ("audience:\n  regions: [Kent County]\n", 9, "not a lower-case key"),
])
def test_front_matter_problem_names_file_and_line(front: str, line: int, fragment: str) -> None:
    text = GOOD_FRONT.replace("topic: newsletter\n", "topic: newsletter\n" + front) + "Body.\n"
    found = problems(text)
    assert any(p.startswith(f"ed.md:{line}: ") and fragment in p for p in found), found


def test_bad_date_is_named_on_its_line() -> None:
    found = problems(GOOD_FRONT.replace("2024-03-01", "2024-13-45") + "Body.\n")
    assert found == ["ed.md:4: bad date '2024-13-45': write it as YYYY-MM-DD"]


def test_missing_subject_is_reported() -> None:
    found = problems(GOOD_FRONT.replace("subject: Test subject\n", "") + "Body.\n")
    assert any("missing subject" in p for p in found), found


def test_every_problem_is_reported_in_one_pass() -> None:
    text = (GOOD_FRONT.replace("issue: 1", "issue: 0").replace("topic: newsletter\n",
                                                                  "topic: newsletter\nx: 1\n")
            + "A [here](#) and <i>b</i>.\n\n## S\n\nSee [x](javascript:y).\n")
    found = problems(text)
    assert len(found) >= 5, found
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines), "problems are listed in file order"


def test_subject_with_line_break_is_refused() -> None:
    found = problems(GOOD_FRONT.replace("subject: Test subject",
                                        'subject: "Hi\\nBcc: x@example.com"') + "Body.\n")
    assert any(p.startswith("ed.md:5: ") and "one line" in p for p in found), found


def test_front_matter_must_be_present_and_closed() -> None:
    assert problems("Just text\n") == [
        "ed.md:1: the file must start with '---' and YAML front matter"]
    assert problems("---\ntitle: x\n") == ["ed.md:1: the front matter is not closed with '---'"]


def test_invalid_yaml_names_its_line() -> None:
    found = problems("---\ntitle: x\nsubject: [unclosed\n---\nBody.\n")
    assert found and found[0].startswith("ed.md:") and "not valid YAML" in found[0]


def test_invalid_yaml_is_said_in_one_sentence_with_the_files_line_numbers() -> None:
    """PyYAML counts lines from the front matter and quotes its parser ("while parsing a flow
    sequence"); the author gets the file's lines and words."""
    text = GOOD_FRONT.replace("topic: newsletter", "topic: [newsletter\nx: 1") + "Body.\n"
    found = problems(text)
    assert found[0] == ("ed.md:8: front matter is not valid YAML: expected ',' or ']', but "
                        "got ':', in the list in [ ] that starts on line 7; is a bracket or "
                        "quote missing?")
    assert "while parsing" not in found[0] and '"<unicode string>"' not in found[0]


def test_an_empty_subject_is_said_in_words_not_the_validators() -> None:
    assert problems(GOOD_FRONT.replace("subject: Test subject", 'subject: ""') + "Body.\n") \
        == ["ed.md:5: subject is empty: write one"]


def test_each_of_several_problems_carries_its_own_hint() -> None:
    with pytest.raises(EditionErrors) as info:
        parse_edition(GOOD_FRONT + "A <i>b</i>.\n\n![](https://example.org/a.png)\n", "ed.md")
    lines = str(info.value).splitlines()[1:]
    assert lines == ["ed.md:9: raw HTML is not allowed: '<i>' (write it in Markdown)",
                     "ed.md:9: raw HTML is not allowed: '</i>' (write it in Markdown)",
                     "ed.md:11: image without alt text: 'https://example.org/a.png' "
                     "(write ![what it shows](https://...))"]
    assert info.value.hint is None  # not the first problem's hint alone, under them all


def test_link_problem_accepts_https_mailto_and_contact() -> None:
    assert link_problem("https://example.org/page") is None
    assert link_problem("mailto:someone@example.org") is None
    assert link_problem("contact:") is None
    assert link_problem("data:text/html,<script>") is not None
    assert link_problem("  ") == "empty link target"


def test_case_files_report_their_expected_first_problem() -> None:
    # Each case file's first line is a comment "<!-- expect LINE: text -->"; the file itself
    # is otherwise a whole edition, so the cases read like real mistakes.
    cases = sorted(CASES.glob("*.md"))
    assert cases
    for case in cases:
        first, _, rest = case.read_text().partition("\n")
        expect = first.removeprefix("<!-- expect ").removesuffix(" -->")
        line, _, fragment = expect.partition(": ")
        found = problems(rest)
        # The comment line was removed, so shift the expected line by one.
        assert any(p.startswith(f"ed.md:{int(line) - 1}: ") and fragment in p
                   for p in found), (case.name, found)


# ---- the CLI faces: `mailer edition validate | preview` ----

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import os

    for key in list(os.environ):
        if key.startswith("MAILER_") and not key.startswith("MAILER_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAILER_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MAILER_SECRET_KEY", "s" * 40)
    monkeypatch.setenv("MAILER_SUPPRESSION_KEY", "k" * 40)
    monkeypatch.setenv("MAILER_CONTACT_ADDRESS", "team@news.example.org")
    return tmp_path / "var"


def test_cli_validate_passes_the_sample_and_names_lines_of_a_bad_file(
        cli_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    assert run(["edition", "validate", str(SAMPLE)]) == 0
    assert "8 sections" in capsys.readouterr().out
    bad = tmp_path / "bad.md"
    bad.write_text(GOOD_FRONT + "See [it](#) and <b>x</b>.\n")
    assert run(["edition", "validate", str(bad)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{bad}:9: placeholder link" in err.replace("\n", "")
    assert "raw HTML" in err


def test_cli_preview_writes_html_text_and_eml_and_sends_with_to(
        cli_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import email
    from email import policy

    from mailer.cli import run
    from mailer.devsink import DevSink

    with DevSink(tmp_path / "sink", port=0) as sink:
        monkeypatch.setenv("MAILER_SMTP_URL", sink.url)
        assert run(["edition", "preview", str(SAMPLE), "--to", "me@example.org"]) == 0
        received = sink.messages()
        assert len(received) == 1 and received[0].rcpt_to == ("me@example.org",)
        raw = sink.raw(received[0].key)
    folder = cli_env / "preview"
    html = (folder / f"{SAMPLE.stem}.html").read_text()
    text = (folder / f"{SAMPLE.stem}.txt").read_text()
    eml = (folder / f"{SAMPLE.stem}.eml").read_bytes()
    assert "Dear Preview Reader," in html and "Dear Preview Reader," in text
    assert "@@" not in html and "team@news.example.org" in text
    msg = email.message_from_bytes(eml, policy=policy.default)
    assert msg["To"].addresses[0].addr_spec == "me@example.org"
    assert email.message_from_bytes(raw, policy=policy.default)["Message-ID"] == (
        msg["Message-ID"])
