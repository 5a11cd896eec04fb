"""Rendering and message building: slots, escaping, headers, DKIM, round trip, equivalence."""

from __future__ import annotations

import base64
import email
import json
import quopri
import re
import subprocess
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.config import Settings
from mailer.edition import load_edition, parse_edition
from mailer.errors import EditionError
from mailer.reference import message_id
from mailer.render import (
    POLICY,
    CompiledEdition,
    DkimKey,
    MessageRefused,
    Recipient,
    RecipientUrls,
    build_message,
    build_reference_message,
    check_round_trip,
    compile_edition,
    list_unsubscribe,
    mjml_to_html,
    personalise,
    preflight,
    vague_link_text,
)
from mailer.smtp import _stuff

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
INJECTION = "Hi =?UTF-8?Q?=0A?=Bcc: injected@example.com"
FRONT = """---
title: {title}
issue: 1
date: 2024-03-01
subject: {subject}
{preheader}topic: newsletter
---
"""


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(var_dir=tmp_path_factory.mktemp("var"), base_url="https://news.example.org",
                    contact_address="msht-team@news.example.org",
                    from_address="bulletin@news.example.org", list_id="msht.news.example.org",
                    secret_key="s" * 40, suppression_key="k" * 40)


@pytest.fixture(scope="module")
def compiled(conf: Settings) -> CompiledEdition:
    return compile_edition(load_edition(SAMPLE), conf)


def urls_for(n: int = 7, mailto: str | None = None) -> RecipientUrls:
    return RecipientUrls(unsubscribe=f"https://news.example.org/u/tok{n}-Zq?a=1&b=2",
                         preferences=f"https://news.example.org/prefs/pt{n}",
                         view_online=f"https://news.example.org/archive/2020-q3?r={n}",
                         unsubscribe_mailto=mailto)


def mid(conf: Settings, subscriber: int = 7) -> str:
    return message_id(conf.secret(), 1, subscriber, "news.example.org")


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def bodies(raw: bytes) -> tuple[str, str]:
    msg = parse(raw)
    return (msg.get_body(("plain",)).get_content(),  # type: ignore[union-attr]
            msg.get_body(("html",)).get_content())  # type: ignore[union-attr]


def compile_source(conf: Settings, body: str, *, title: str = "Test bulletin",
                   subject: str = "Test subject", preheader: str | None = "Pre") -> CompiledEdition:
    pre = f"preheader: {preheader}\n" if preheader else ""
    text = FRONT.format(title=title, subject=subject, preheader=pre) + body
    return compile_edition(parse_edition(text, "t.md"), conf)


# ---- compile ----

def test_sample_compiles_with_no_warnings_and_keeps_the_phone_layout(
        compiled: CompiledEdition) -> None:
    assert compiled.warnings == []
    html = compiled.html
    assert html.lower().startswith("<!doctype html>"), "premailer dropped the doctype"
    assert '<html lang="en-GB"' in html
    media = re.search(r"@media only screen and \(max-width: ?480px\).*?}\s*}", html, re.DOTALL)
    assert media and "!important" in media[0], "the mobile overrides lost their !important"
    assert "prefers-color-scheme: dark" in html
    assert "<h1" in html and html.count("<h2") == 8
    assert "msht-team@news.example.org" in html and "Jana.Sherrin" not in html
    assert 'style="' in html, "premailer inlined nothing"


def test_dates_section_puts_each_date_in_its_row_header(compiled: CompiledEdition) -> None:
    # markdown-it starts a bold-first list item with an empty text token; the date must still
    # land in the <th> and leave the <td> with only the event.
    table = re.search(r'<table[^>]*>(?:(?!</table>).)*?<th scope="row".*?</table>',
                      compiled.html, re.DOTALL)
    assert table
    rows = re.findall(r'<th scope="row"[^>]*>(.*?)</th>\s*<td[^>]*>(.*?)</td>', table[0],
                      re.DOTALL)
    cells = [(re.sub(r"<[^>]+>", "", th).strip(), re.sub(r"<[^>]+>", "", td).strip())
             for th, td in rows]
    assert cells == [("14 September", "Operation Aidant, focus on labour exploitation"),
                     ("18 October", "World Anti-Slavery Day"),
                     ("2 December", "The International Day for the Abolition of Slavery")]


def test_every_slot_marker_survives_mjml_and_premailer(compiled: CompiledEdition) -> None:
    for slot, marker in compiled.markers.items():
        assert marker in compiled.html, slot
        assert marker in compiled.text, slot
    assert f'href="{compiled.markers["unsubscribe"]}"' in compiled.html


def test_text_part_is_wrapped_at_78_and_lists_links(compiled: CompiledEdition) -> None:
    for line in compiled.text.splitlines():
        # A URL is never broken, so only lines carrying one may run long.
        assert len(line) <= 78 or "https://" in line or "@@" in line, line
    assert "[1] https://example.org/modern-slavery-pec/research-priorities-survey" in (
        compiled.text)
    assert "NRM guidance:\n  https://example.org/home-office/national-referral-mechanism-guidance" \
        in compiled.text
    assert "please contact us at msht-team@news.example.org." in compiled.text
    assert "Kent Police NRM      150" in compiled.text


def test_compiled_edition_survives_json_storage(compiled: CompiledEdition, conf: Settings) -> None:
    stored = json.loads(json.dumps(compiled.to_dict()))
    again = CompiledEdition.from_dict(stored)
    assert again.html == compiled.html and again.markers == compiled.markers
    r = Recipient("a@example.org", "Ann")
    assert bodies(build_message(again, r, urls_for(), message_id=mid(conf))) == bodies(
        build_message(compiled, r, urls_for(), message_id=mid(conf)))


def test_hostile_edition_text_is_escaped_in_html_and_literal_in_text(conf: Settings) -> None:
    c = compile_source(conf, "Sum {{ 7*7 }} and 5 < 6 & 7 > 3.\n",
                       title='"<script>alert(1)</script>"')
    assert "<script>alert(1)" not in c.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in c.html
    assert "{{ 7*7 }}" in c.html and "49" not in c.html
    assert "5 &lt; 6 &amp; 7 &gt; 3" in c.html
    assert "<script>alert(1)</script>" in c.text and "{{ 7*7 }}" in c.text


def test_mjml_parse_error_names_the_line() -> None:
    source = "<mjml>\n<mj-body>\n<mj-section>\n<mj-column>\n<mj-text>hi</mj-column>\n"
    with pytest.raises(EditionError) as info:
        mjml_to_html(source, "t.mjml")
    assert info.value.location == "t.mjml:5"
    with pytest.raises(EditionError) as info:
        mjml_to_html("<mjml>\n<mj-body>\n<mj-text color=red>x</mj-text>\n</mj-body></mjml>",
                     "t.mjml")
    assert info.value.location == "t.mjml:3"


# ---- preflight ----

def test_preflight_warns_about_each_problem(conf: Settings) -> None:
    c = compile_source(conf, "Read it [here](https://example.org/x).\n\n" + "Words. " * 16000,
                       subject="S" * 80, preheader=None)
    text = "\n".join(c.warnings)
    assert "Gmail clips" in text
    assert "link text 'here'" in text
    assert "no preheader" in text
    # The subject as sent: "OFFICIAL: " (mailer.marking) and the 80 characters written.
    assert "the subject is 90 characters" in text
    c.html = c.html.replace(c.markers["unsubscribe"], "https://example.org/nothing")
    c.html += '<img src="https://example.org/a.png"><a href="#">Top</a>'
    again = "\n".join(preflight(c))
    assert "no unsubscribe link in the HTML part" in again
    assert "image without alt text: https://example.org/a.png" in again
    assert "link 'Top' has an empty or '#' target" in again


@pytest.mark.parametrize(("text", "vague"), [
    ("here", True), ("Click here", True), ("Click here to read the guide", True),
    ("click   this link.", True), ("Read more", True), ("more", True),
    ("Home Office guidance on modern slavery", False), ("Here is the NRM guidance", False),
    ("Clicker training for dogs", False)])
def test_link_text_that_says_nothing_on_its_own_is_flagged(text: str, vague: bool) -> None:
    assert vague_link_text(text) is vague


# ---- personalise ----

@pytest.mark.parametrize("slot", ["name", "unsubscribe", "preferences", "view_online"])
def test_each_slot_gets_the_exact_recipient_value(compiled: CompiledEdition, conf: Settings,
                                                  slot: str) -> None:
    urls = urls_for(42)
    recipient = Recipient("zoe@example.org", "Zoë O'Brien & Co")
    values = {"name": recipient.name, "unsubscribe": urls.unsubscribe,
              "preferences": urls.preferences, "view_online": urls.view_online}
    value = values[slot]
    escaped = (value.replace("&", "&amp;").replace("'", "&#39;"))
    page = personalise(compiled, recipient, urls)
    assert escaped in page.html and value in page.text
    text, html = bodies(build_message(compiled, recipient, urls, message_id=mid(conf)))
    assert escaped in html and value in text
    assert "@@" not in html and "@@" not in text


@pytest.mark.parametrize("name", ["<script>alert(1)</script>", "{{ 7*7 }}", "{% raw %}"])
def test_hostile_names_render_literally(compiled: CompiledEdition, conf: Settings,
                                        name: str) -> None:
    text, html = bodies(build_message(compiled, Recipient("h@example.org", name), urls_for(),
                                      message_id=mid(conf)))
    assert f"Dear {name}," in text
    assert f"Dear {name.replace('<', '&lt;').replace('>', '&gt;')}," in html
    assert "<script>alert" not in html and "Dear 49," not in html


def test_a_name_that_is_a_slot_marker_stays_those_characters(compiled: CompiledEdition,
                                                             conf: Settings) -> None:
    marker = compiled.markers["unsubscribe"]
    urls = urls_for(3)
    text, html = bodies(build_message(compiled, Recipient("m@example.org", marker), urls,
                                      message_id=mid(conf)))
    assert f"Dear {marker}," in text and f"Dear {marker}," in html
    assert f"Unsubscribe: {urls.unsubscribe}" in text
    assert text.count(marker) == 1 and html.count(marker) == 1


def test_missing_name_greets_a_colleague(compiled: CompiledEdition) -> None:
    page = personalise(compiled, Recipient("x@example.org", None), urls_for())
    assert "Dear colleague," in page.text and "Dear colleague," in page.html


# ---- headers ----

def header_lines(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return re.split(rb"\r\n(?![ \t])", head)


def test_headers_follow_the_recommended_set(compiled: CompiledEdition, conf: Settings) -> None:
    raw = build_message(compiled, Recipient("resp@example.org", "Resp"), urls_for(),
                        message_id=mid(conf))
    msg = parse(raw)
    assert list(msg.keys()) == [
        "From", "Reply-To", "Subject", "Date", "To", "Message-ID", "List-Unsubscribe",
        "List-Id", "List-Unsubscribe-Post", "MIME-Version", "Content-Type"]
    assert str(msg["From"]) == "Kent & Essex MSHT Co-ordinators <bulletin@news.example.org>"
    assert str(msg["Reply-To"]) == conf.contact_address  # no reply_to set: the contact address
    assert msg["To"].addresses[0].addr_spec == "resp@example.org"
    assert len(msg["To"].addresses) == 1
    assert msg["Message-ID"] == mid(conf)
    assert msg["List-Id"].endswith("<msht.news.example.org>")
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert all(p["Content-Transfer-Encoding"] == "quoted-printable" for p in msg.iter_parts())
    assert raw.isascii() and all(len(x) <= 998 for x in raw.split(b"\r\n"))
    assert not msg.defects and not any(p.defects for p in msg.iter_parts())


def test_one_list_unsubscribe_never_encoded_even_when_long(compiled: CompiledEdition,
                                                           conf: Settings) -> None:
    long_url = "https://news.example.org/u/" + "A" * 400
    urls = RecipientUrls(long_url, "https://news.example.org/p/x", "https://news.example.org/v")
    raw = build_message(compiled, Recipient("a@example.org"), urls, message_id=mid(conf))
    lines = [x for x in header_lines(raw) if x.lower().startswith(b"list-unsubscribe:")]
    assert lines == [f"List-Unsubscribe: <{long_url}>".encode()]
    assert b"=?" not in lines[0] and len(lines[0]) <= 998
    too_long = RecipientUrls("https://news.example.org/u/" + "A" * 1000, urls.preferences,
                             urls.view_online)
    with pytest.raises(MessageRefused, match="998"):
        build_message(compiled, Recipient("a@example.org"), too_long, message_id=mid(conf))


def test_mailto_is_added_only_when_configured(compiled: CompiledEdition, conf: Settings) -> None:
    plain = parse(build_message(compiled, Recipient("a@example.org"), urls_for(),
                                message_id=mid(conf)))
    assert "mailto:" not in plain["List-Unsubscribe"]
    urls = urls_for(mailto="mailto:unsubscribe@news.example.org?subject=unsub-tok7")
    both = parse(build_message(compiled, Recipient("a@example.org"), urls, message_id=mid(conf)))
    assert both["List-Unsubscribe"] == (
        f"<{urls.unsubscribe}>, <mailto:unsubscribe@news.example.org?subject=unsub-tok7>")
    assert both.get_all("List-Unsubscribe") and len(both.get_all("List-Unsubscribe")) == 1


def test_unsubscribe_url_must_be_https(compiled: CompiledEdition, conf: Settings) -> None:
    urls = RecipientUrls("http://news.example.org/u/x", "https://p", "https://v")
    with pytest.raises(MessageRefused, match="https"):
        build_message(compiled, Recipient("a@example.org"), urls, message_id=mid(conf))


def test_post_header_is_byte_exact(compiled: CompiledEdition, conf: Settings) -> None:
    raw = build_message(compiled, Recipient("a@example.org"), urls_for(), message_id=mid(conf))
    assert raw.count(b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n") == 1
    assert raw.lower().count(b"list-unsubscribe-post") == 1


def test_non_ascii_subject_and_names_use_encoded_words(conf: Settings) -> None:
    c = compile_source(conf, "Body.\n", subject="Bulletin d’été for Zoë")
    raw = build_message(c, Recipient("z@example.org", "Zoë Nguyễn"), urls_for(),
                        message_id=mid(conf))
    assert raw.isascii()
    subject = next(x for x in header_lines(raw) if x.startswith(b"Subject:"))
    assert b"=?utf-8?" in subject
    msg = parse(raw)
    assert msg["Subject"] == "OFFICIAL: Bulletin d’été for Zoë"
    assert msg["To"].addresses[0].display_name == "Zoë Nguyễn"


def test_message_id_is_stable_per_edition_and_subscriber(compiled: CompiledEdition,
                                                         conf: Settings) -> None:
    first = build_message(compiled, Recipient("a@example.org"), urls_for(), message_id=mid(conf))
    retry = build_message(compiled, Recipient("a@example.org"), urls_for(), message_id=mid(conf))
    assert first == retry
    assert parse(first)["Message-ID"] != parse(build_message(
        compiled, Recipient("b@example.org"), urls_for(), message_id=mid(conf, 8)))["Message-ID"]


# ---- injection and the round trip ----

def test_injection_payload_in_a_name_is_refused(compiled: CompiledEdition,
                                                conf: Settings) -> None:
    with pytest.raises(MessageRefused, match="encoded-word"):
        build_message(compiled, Recipient("a@example.org", INJECTION), urls_for(),
                      message_id=mid(conf))


def test_injection_payload_in_a_subject_is_refused(conf: Settings) -> None:
    with pytest.raises(EditionError, match="encoded-word"):
        compile_source(conf, "Body.\n", subject=f'"{INJECTION}"')


@pytest.mark.parametrize("bad", [
    "a@example.org\r\nBcc: x@evil.example", "a@example.org, b@example.org", "not-an-address",
    "<a@example.org>"])
def test_unusable_recipient_addresses_are_refused(compiled: CompiledEdition, conf: Settings,
                                                  bad: str) -> None:
    with pytest.raises(MessageRefused):
        build_message(compiled, Recipient(bad), urls_for(), message_id=mid(conf))


def test_round_trip_check_catches_the_stdlib_injection() -> None:
    # What Python's own generator makes of the payload on this interpreter: on 3.11.7
    # (CVE-2024-6923) the encoded LF becomes a real line break and a Bcc header appears.
    msg = EmailMessage(policy=POLICY)
    msg["From"] = "a@example.org"
    msg["Subject"] = INJECTION
    msg["List-Unsubscribe"] = "<https://news.example.org/u/x>"
    msg.set_content("hi")
    raw = msg.as_bytes()
    if b"Bcc: injected" in raw:
        with pytest.raises(MessageRefused):
            check_round_trip(raw, ["From", "Subject", "List-Unsubscribe", "Content-Type",
                                   "Content-Transfer-Encoding", "MIME-Version"])
    else:  # a patched Python encodes it: then the headers are unchanged
        assert b"\nBcc:" not in raw


@pytest.mark.parametrize("raw", [
    b"From: a@example.org\r\nSubject: Hi\r\nBcc: injected@example.com\r\n"
    b"List-Unsubscribe: <https://x.example/u>\r\n\r\nbody\r\n",
    b"From: a@example.org\r\nSubject: Hi \nBcc: injected@example.com\r\n"
    b"List-Unsubscribe: <https://x.example/u>\r\n\r\nbody\r\n",
    b"From: a@example.org\r\nSubject: Hi\r\n"
    b"List-Unsubscribe: <https://x.example/u>\r\n\r\nbody\r\n" + b"x" * 1000 + b"\r\n",
    b"From: a@example.org\r\nSubject: Hi\r\nList-Unsubscribe: <https://x.example/u>\r\n"
    b"List-Unsubscribe: <https://y.example/u>\r\n\r\nbody\r\n",
])
def test_round_trip_check_refuses_bad_bytes(raw: bytes) -> None:
    with pytest.raises(MessageRefused):
        check_round_trip(raw, ["From", "Subject", "List-Unsubscribe"])


def test_round_trip_check_accepts_a_good_message(compiled: CompiledEdition,
                                                 conf: Settings) -> None:
    raw = build_message(compiled, Recipient("a@example.org", "Ann"), urls_for(),
                        message_id=mid(conf))
    check_round_trip(raw, parse(raw).keys(), "a@example.org")


def test_no_line_starts_with_a_dot_so_smtp_has_nothing_to_stuff(conf: Settings,
                                                                 tmp_path: Path) -> None:
    # A leading dot is written =2E: SMTP would otherwise copy the message to double it.
    dotted = tmp_path / "dots.md"
    dotted.write_text(SAMPLE.read_text() + "\n.NET teams: read this.\n\n" + "word " * 14
                      + ".starts the next wrapped line\n", encoding="utf-8")
    compiled = compile_edition(load_edition(dotted), conf)
    raw = build_message(compiled, Recipient("d@example.org", ".Dot"), urls_for(3),
                        message_id=mid(conf))
    assert not raw.startswith(b".") and b"\r\n." not in raw
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")  # the worker relies on it
    assert _stuff(raw, prepared=True) == _stuff(raw)  # so SMTP may send it unscanned
    text, html = bodies(raw)
    assert ".NET teams: read this." in text and ".NET teams: read this." in html
    assert ".Dot" in text  # the name slot, at the start of a QP line
    assert max(len(x) for x in raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n")) <= 76


# ---- the fast path equals the EmailMessage build ----

@pytest.mark.parametrize("recipient", [
    Recipient("plain@example.org"),
    Recipient("ann@example.org", "Ann Smith"),
    Recipient("j@example.org", 'Smith, John "JJ" <admin@evil.com>'),
    Recipient("zoe@example.org", "Zoë O’Brien"),
    Recipient("long@example.org", "Þórunn " * 12),
])
def test_fast_build_parses_back_equal_to_the_reference(compiled: CompiledEdition,
                                                       conf: Settings,
                                                       recipient: Recipient) -> None:
    urls = urls_for(9, mailto="mailto:u@news.example.org")
    fast = build_message(compiled, recipient, urls, message_id=mid(conf))
    ref = build_reference_message(compiled, recipient, urls, message_id=mid(conf))
    a, b = parse(fast), parse(ref)

    def headers(msg: EmailMessage) -> list[tuple[str, str]]:
        return [(k, re.sub(r'boundary="[^"]*"', "", str(v))) for k, v in msg.items()]

    assert headers(a) == headers(b)
    assert str(a["To"]) == str(b["To"])
    assert bodies(fast) == bodies(ref)
    assert [p.get_content_type() for p in a.iter_parts()] == ["text/plain", "text/html"]
    # The fast path keeps RFC 2045's 76-character limit for quoted-printable lines.
    body = fast.split(b"\r\n\r\n", 1)[1]
    assert max(len(x) for x in body.split(b"\r\n")) <= 76


# ---- DKIM ----

@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, bytes]:
    folder = tmp_path_factory.mktemp("dkim")
    private = folder / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True,
                   capture_output=True)
    der = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return DkimKey("test", "news.example.org", private.read_bytes()), record


def verify(raw: bytes, record: bytes) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"test._domainkey.news.example.org."
        return record

    return bool(dkim.verify(raw, dnsfunc=dnsfunc))


def test_dkim_signature_verifies_and_covers_both_unsubscribe_headers(
        compiled: CompiledEdition, conf: Settings, dkim_key: tuple[DkimKey, bytes]) -> None:
    key, record = dkim_key
    raw = build_message(compiled, Recipient("a@example.org", "Ann"), urls_for(),
                        message_id=mid(conf), dkim=key)
    assert raw.startswith(b"DKIM-Signature:")
    assert verify(raw, record)
    sig = parse(raw)["DKIM-Signature"]
    tags = dict(t.strip().split("=", 1) for t in re.sub(r"\s+", " ", sig).split(";") if "=" in t)
    h = [x.strip().lower() for x in tags["h"].split(":")]
    assert tags["a"] == "rsa-sha256"
    assert h.count("list-unsubscribe") == 2 and h.count("list-unsubscribe-post") == 2


@pytest.mark.parametrize("tamper", [
    lambda raw: raw.replace(b"List-Unsubscribe: <https://news.example.org/u/tok7",
                            b"List-Unsubscribe: <https://evil.example.org/u/tok7"),
    lambda raw: raw.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
                            b"List-Unsubscribe-Post: List-Unsubscribe=One-Clack"),
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u>"
                            b"\r\n\r\n", 1),
    lambda raw: raw.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe-Post: "
                            b"List-Unsubscribe=One-Click\r\n\r\n", 1),
], ids=["unsubscribe-changed", "post-changed", "unsubscribe-duplicated", "post-duplicated"])
def test_dkim_fails_after_an_unsubscribe_header_is_changed_or_duplicated(
        compiled: CompiledEdition, conf: Settings, dkim_key: tuple[DkimKey, bytes],
        tamper: object) -> None:
    key, record = dkim_key
    raw = build_message(compiled, Recipient("a@example.org"), urls_for(), message_id=mid(conf),
                        dkim=key)
    assert verify(raw, record)
    changed = tamper(raw)  # type: ignore[operator]
    assert changed != raw
    assert not verify(changed, record)


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=300)
       | st.from_regex(r"https://news\.example\.org/u/[A-Za-z0-9._-]{0,250}", fullmatch=True))
@settings(max_examples=300, deadline=None)
def test_a_slot_value_decodes_to_itself_in_short_lines_none_starting_with_a_dot(
        value: str) -> None:
    # Values sit between soft breaks, so each starts a line; signed URLs take the fast path.
    # (Control characters never get here: build_message refuses them first.)
    from mailer.render import _qp_value

    encoded = _qp_value(value)
    assert encoded.endswith(b"=\r\n")
    lines = encoded.split(b"\r\n")
    assert all(len(line) <= 76 and not line.startswith(b".") for line in lines)
    assert quopri.decodestring(encoded.replace(b"\r\n", b"\n")).decode("utf-8") == value


# ---- what is checked once per edition, and what per message ----

GOOD_BLOCK = (b"Date: Tue, 01 Dec 2026 09:00:00 +0000\r\nTo: Ann <a@example.org>\r\n"
              b"Message-ID: <e1.s2.0123456789abcdef@news.example.org>\r\n"
              b"List-Unsubscribe: <https://news.example.org/u/x>\r\n")


def test_the_per_recipient_header_lines_pass_when_they_parse_back() -> None:
    from mailer.render import _check_per_recipient

    _check_per_recipient(GOOD_BLOCK, "Ann <a@example.org>")


@pytest.mark.parametrize("block", [
    GOOD_BLOCK.replace(b"To: Ann <a@example.org>\r\n",
                       b"To: Ann <a@example.org>\r\nBcc: injected@example.com\r\n"),
    GOOD_BLOCK.replace(b"To: Ann <a@example.org>\r\n",
                       b"To: Ann <a@example.org>\nBcc: injected@example.com\r\n"),
    GOOD_BLOCK.replace(b"Ann <a@example.org>", b"Ann <b@example.org>"),
    GOOD_BLOCK.replace(b"<https://news.example.org/u/x>", b"<https://x/" + b"u" * 1000 + b">"),
])
def test_the_per_recipient_header_lines_refuse_an_injected_or_changed_line(block: bytes) -> None:
    from mailer.render import _check_per_recipient

    with pytest.raises(MessageRefused):
        _check_per_recipient(block, "Ann <a@example.org>")


@pytest.mark.parametrize("change", [
    {"tail": b"\r\n.\r\n"},  # a line SMTP would read as the end of the data
    {"tail": b"\r\n.hidden\r\n"},  # a dot SMTP would strip
    {"head": b"From: a@example.org\r\nBcc: injected@example.com\r\n"},
    {"head": b"From: a@example.org\nSubject: x\r\n"},
])
def test_a_skeleton_that_breaks_what_messages_rely_on_is_refused_once_per_edition(
        compiled: CompiledEdition, change: dict[str, bytes]) -> None:
    import dataclasses

    with pytest.raises(EditionError):
        dataclasses.replace(compiled.skeleton(), **change).check("edition.md")


@pytest.mark.parametrize(("name", "word"), [
    ("Zoë Ångström!", "=?utf-8?q?Zo=C3=AB_=C3=85ngstr=C3=B6m!?="),
    ("a" * 57 + "é", "=?utf-8?q?" + "a" * 57 + "=C3=A9?="),  # 75 characters: the most in one
    ("Ünïcödé " * 12, None),
])
def test_a_non_ascii_name_reaches_the_reader_as_written(conf: Settings, name: str,
                                                        word: str | None) -> None:
    # Short names are one RFC 2047 Q encoded-word (at most 75 characters, `_` for a space);
    # longer ones are encoded by the email package. Either way every reader sees the name.
    c = compile_source(conf, "Body.\n")
    raw = build_message(c, Recipient("z@example.org", name), urls_for(), message_id=mid(conf))
    to = next(x for x in re.split(rb"\r\n(?![ \t])", raw) if x.startswith(b"To:"))
    if word is not None:
        assert to == f"To: {word} <z@example.org>".encode()
    assert " ".join(parse(raw)["To"].addresses[0].display_name.split()) == " ".join(name.split())


def test_one_encoded_word_holds_at_most_75_characters() -> None:
    from mailer.render import _encoded_word

    assert _encoded_word("Zoë Ångström!") == "=?utf-8?q?Zo=C3=AB_=C3=85ngstr=C3=B6m!?="
    assert _encoded_word("a" * 57 + "é") == "=?utf-8?q?" + "a" * 57 + "=C3=A9?="  # 75
    assert _encoded_word("a" * 58 + "é") is None  # 76: the email package folds it instead


@pytest.mark.parametrize(("url", "ok"), [
    ("https://news.example.org/u/é", False),  # not ASCII
    ("https://news.example.org/u/a b", False),
    ("https://news.example.org/u/a<b", False),
    ("https:///u/token", False),  # no host
    ("http://[::1]:8000/u/token", True),  # plain http only for a loopback dev server
    ("http://news.example.org/u/token", False),
])
def test_only_usable_unsubscribe_urls_go_into_the_header(url: str, ok: bool) -> None:
    urls = RecipientUrls(url, "https://p.example.org", "https://v.example.org",
                         unsubscribe_mailto="mailto:unsubscribe+Xy@news.example.org")
    if ok:
        assert list_unsubscribe(urls) == f"<{url}>, <mailto:unsubscribe+Xy@news.example.org>"
    else:
        with pytest.raises(MessageRefused, match="unsubscribe URL"):
            list_unsubscribe(urls)


def test_reply_to_is_the_setting_and_a_header_injection_is_refused(conf: Settings) -> None:
    edition = load_edition(SAMPLE)
    chosen = conf.model_copy(update={"reply_to": "msht.replies@kent.police.uk"})
    raw = build_message(compile_edition(edition, chosen), Recipient("resp@example.org", "R"),
                        urls_for(), message_id=mid(conf))
    assert parse(raw)["Reply-To"] == "msht.replies@kent.police.uk"
    with pytest.raises(EditionError):
        compile_edition(edition, conf.model_copy(
            update={"reply_to": "a@b.example\r\nBcc: everyone@example.org"}))
