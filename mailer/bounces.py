"""Read what comes back: bounces (DSNs and the non-standard kinds), complaints, auto-replies.

Pure: bytes in, a `Verdict` out. No database, no network. The store side (delivery rows,
subscriber state, the suppression policy over time) is built on top of `classify_inbound`, and
the transports that feed it live in `mailer.inbound`.

The order matters and is deliberate:
1. auto-replies (vacation, out-of-office) are recognised first and ignored, but only when the
   message is not bounce-shaped: Postfix, Exim and Gmail put `Auto-Submitted: auto-replied` on
   their DSNs too (RFC 3834 §5 allows it), so that header alone cannot mean "vacation";
2. ARF complaint reports (RFC 5965);
3. RFC 3464 DSNs, read here, because flufl.bounce reads `Action:` and ignores `Status:`, and
   skips non-ASCII recipients;
4. flufl.bounce's heuristics for the non-standard formats (qmail, Exim, Exchange, ...);
5. a message from a person (a From address, and none of the signs of an automatic message,
   `automatic_reason`) is a reply, which `mailer.replies` forwards to the contact address;
6. otherwise unknown.

Which delivery a message is about comes from our signed reference (`mailer.reference`), never
from free text: the VERP envelope recipient first, then the original message's Message-ID as
returned in the bounce. Where a relay forbids VERP and also rewrites the Message-ID (Amazon SES
does; so do some gateways), the signed unsubscribe token in the returned `List-Unsubscribe`
still names the subscriber and the topic, though not the edition: the store then takes the
delivery to that subscriber the report is most likely about.
"""

from __future__ import annotations

import email
import email.message
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from email.utils import getaddresses, parseaddr
from enum import StrEnum
from typing import TypedDict

from flufl.bounce import all_failures

from mailer.reference import parse_delivery_ref
from subscribers.tokens import InvalidToken, Lifetimes, Purpose, Tokens

log = logging.getLogger(__name__)

#: Past this size only the head of a message is parsed. The machine-readable parts of a DSN or
#: an ARF report come first, so a truncated parse still finds them; the tail is usually the
#: returned original, which we do not need in full.
MAX_PARSE_BYTES = 4 * 1024 * 1024


class Kind(StrEnum):
    HARD = "hard"
    SOFT = "soft"
    COMPLAINT = "complaint"
    AUTO_REPLY = "auto_reply"
    # A person wrote back (issue 15): `mailer.replies` forwards it. Never stored in
    # inbound_message: a reply is kept in its own table, or filed there as unknown.
    REPLY = "reply"
    UNKNOWN = "unknown"


#: Kinds the store should act on; the rest are kept and logged but change nothing.
ACTIONABLE = frozenset({Kind.HARD, Kind.SOFT, Kind.COMPLAINT})

_STATUS_SUBJECTS = {
    "0": "other", "1": "addressing", "2": "mailbox", "3": "mail-system", "4": "network",
    "5": "protocol", "6": "media", "7": "policy",
}


@dataclass(frozen=True)
class Failure:
    """One recipient a report is about: a failed or delayed DSN block, or a heuristic match.

    `status` is the RFC 3463 code (`5.1.1`) when one was found: from `Status:`, the
    Diagnostic-Code or the human-readable text (see `status_source`). `action` is the DSN
    `Action:` (`failed`, `delayed`) or None for non-DSN formats.
    """

    recipient: str
    kind: Kind
    status: str | None = None
    action: str | None = None
    diagnostic: str | None = None
    #: where `status` came from: "status" (the DSN field), "diagnostic" (Diagnostic-Code),
    #: "text" (a code in the human-readable notice), "inferred" (from wording such as
    #: "user unknown"; weakest), or None when there is no code at all
    status_source: str | None = None

    @property
    def status_subject(self) -> str | None:
        """RFC 3463 subject of the code: `addressing` (X.1), `mailbox` (X.2), `policy` (X.7)...

        The policy needs this: a 5.1.x (no such mailbox) suppresses at once, while a 5.7.x
        (rejected by policy) more often means our own authentication or reputation is at fault.
        """
        if not self.status:
            return None
        return _STATUS_SUBJECTS.get(self.status.split(".")[1], "other")


@dataclass(frozen=True)
class DeliveryRef:
    """The (edition, subscriber) our signed reference names, and where in the message it was.

    `edition_id` is None when only an unsubscribe token was found (source
    `original:List-Unsubscribe-token`): it names the subscriber and `topic_id`, not the send.
    """

    edition_id: int | None
    subscriber_id: int
    source: str  # "envelope", "header:Delivered-To", "original:Message-ID", "quoted:Message-ID"...
    topic_id: int | None = None


@dataclass(frozen=True)
class Verdict:
    """What one inbound message is, in terms the store can act on.

    `kind` is the message's overall outcome: hard if any recipient failed permanently, else soft
    if any failed temporarily; complaint for an ARF report; auto_reply and unknown are to be kept
    and logged, not acted on. `failures` lists every recipient the report names (for a
    complaint: the complained-about recipient, when the report says). `reference` is the
    delivery, when our signed token was found; without it the store may fall back to matching
    `recipients` against subscriber addresses.
    """

    kind: Kind
    reason: str
    failures: tuple[Failure, ...] = ()
    reference: DeliveryRef | None = None
    detector: str = "none"  # "auto-reply", "arf", "dsn", "flufl", "none", "error"
    original_message_id: str | None = None
    original_subject: str | None = None  # of the returned original, when it is there
    feedback_type: str | None = None  # ARF Feedback-Type, lowercased
    message_id: str | None = None  # of the inbound message itself
    subject: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def actionable(self) -> bool:
        return self.kind in ACTIONABLE

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(f.recipient for f in self.failures)

    @property
    def status(self) -> str | None:
        """The status code of the worst failure (hard before soft), for one-line displays."""
        for wanted in (Kind.HARD, Kind.SOFT, Kind.COMPLAINT):
            for f in self.failures:
                if f.kind is wanted and f.status:
                    return f.status
        return None

    def summary(self) -> str:
        """One line for logs and the CLI."""
        ref = (f"e{self.reference.edition_id or '?'}.s{self.reference.subscriber_id}"
               f" (from {self.reference.source})" if self.reference else "none")
        who = ", ".join(
            f"{f.recipient} {f.kind}" + (f" {f.status}" if f.status else "")
            for f in self.failures) or "-"
        return f"{self.kind}: {self.reason} | recipients: {who} | delivery: {ref}"


def classify_inbound(
    raw: bytes,
    secret: bytes,
    envelope_recipients: Sequence[str] = (),
    *,
    max_bytes: int = MAX_PARSE_BYTES,
    token_keys: Sequence[bytes] = (),
    envelope_sender: str | None = None,
) -> Verdict:
    """Classify one inbound message (as received: raw RFC 5322 bytes).

    `envelope_recipients` is the RCPT TO the message arrived with, when the transport knows it
    (LMTP/SMTP does; a mailbox may not); a VERP address there is the most trustworthy
    reference. `token_keys` verify the unsubscribe tokens of our links (the settings'
    `token_keys()`, oldest first); without them `secret` alone is tried. Never raises for bad
    input: a message that cannot be read is `unknown` with the reason. `envelope_sender` is the
    MAIL FROM when the transport knows it ("" for the null sender `<>`).

    >>> classify_inbound(b"Subject: hi\\r\\n\\r\\nhello", b"k" * 32).kind
    <Kind.UNKNOWN: 'unknown'>
    """
    notes: list[str] = []
    if not isinstance(raw, bytes | bytearray):
        return Verdict(Kind.UNKNOWN, f"not a message: {type(raw).__name__}", detector="error")
    if len(raw) > max_bytes:
        notes.append(f"message of {len(raw)} bytes: only the first {max_bytes} were read")
        raw = bytes(raw[:max_bytes])
    try:
        msg = email.message_from_bytes(bytes(raw), policy=policy.default)
        return _classify(msg, secret, envelope_recipients, notes, token_keys or (secret,),
                         envelope_sender)
    except Exception as exc:  # a parser or detector bug must not lose the message upstream
        log.exception("could not classify an inbound message")
        return Verdict(Kind.UNKNOWN, f"could not be parsed ({type(exc).__name__}: {exc})",
                       detector="error", notes=tuple(notes))


class _Common(TypedDict):
    """What every verdict on one message carries, whichever detector decides it."""

    reference: DeliveryRef | None
    original_message_id: str | None
    original_subject: str | None
    message_id: str | None
    subject: str | None
    notes: tuple[str, ...]


def _classify(msg: Message, secret: bytes, envelope: Sequence[str], notes: list[str],
              token_keys: Sequence[bytes], envelope_sender: str | None = None) -> Verdict:
    reference = find_reference(msg, secret, envelope, token_keys=token_keys)
    common: _Common = {
        "reference": reference,
        "original_message_id": _original_message_id(msg),
        "original_subject": _original_subject(msg),
        "message_id": _header(msg, "Message-ID") or None,
        "subject": _header(msg, "Subject") or None,
        "notes": tuple(notes),
    }

    auto = _auto_reply_reason(msg)
    if auto:
        return Verdict(Kind.AUTO_REPLY, auto, detector="auto-reply", **common)

    report_type = msg.get_param("report-type", "", header="content-type")
    report_type = report_type.lower() if isinstance(report_type, str) else ""
    if report_type == "feedback-report" or _first_part(msg, "message/feedback-report"):
        return _arf(msg, common)

    if report_type in ("delivery-status", "global-delivery-status") or any(
            _first_part(msg, t) for t in _STATUS_TYPES):
        verdict = _dsn(msg, common)
        if verdict is not None:
            return verdict

    return _heuristic(msg, common, envelope_sender)


# ---- auto-replies ----

_AUTO_SUBJECT = re.compile(
    r"^\s*(automatic reply|auto(matic)?[ -]?(reply|response)|autoreply|out of (the )?office"
    r"|abwesenheitsnotiz|r[ée]ponse automatique|respuesta autom[aá]tica|vacation"
    r"|away from (the|my) office|on (annual )?leave)\b"
    r"|\bis out of the office\b|\bout of office\b",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (status|failure|has failed|notification|incomplete)|returned mail"
    r"|failure notice|mail delivery (failed|system)|not (be )?delivered|delivery delayed"
    r"|nondeliverable|non-delivery|could not be delivered|rejected|bounce",
    re.IGNORECASE,
)
_DAEMONS = ("mailer-daemon", "postmaster", "mail-daemon", "maildaemon", "microsoftexchange")


def _looks_like_bounce(msg: Message) -> bool:
    """Structure or sender that makes a message a delivery report, whatever Auto-Submitted says."""
    if msg.get_content_type() == "multipart/report":
        return True
    if _header(msg, "X-Failed-Recipients"):
        return True
    sender = parseaddr(_header(msg, "From"))[1].lower()
    if sender.split("@")[0].startswith(_DAEMONS):
        return True
    return bool(_BOUNCE_SUBJECT.search(_header(msg, "Subject")))


def _auto_reply_reason(msg: Message) -> str | None:
    if _looks_like_bounce(msg):
        return None
    auto_submitted = _header(msg, "Auto-Submitted").split(";")[0].strip().lower()
    if auto_submitted and auto_submitted != "no":
        return f"auto-reply (Auto-Submitted: {auto_submitted}); ignored"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponse"):
        if _header(msg, name):
            return f"auto-reply ({name}); ignored"
    precedence = _header(msg, "Precedence").strip().lower()
    if precedence == "auto_reply":
        return "auto-reply (Precedence: auto_reply); ignored"
    suppress = _header(msg, "X-Auto-Response-Suppress").lower()
    subject = _header(msg, "Subject")
    if _AUTO_SUBJECT.search(subject):
        return f"auto-reply (subject {subject.strip()[:60]!r}); ignored"
    if precedence in ("junk", "bulk") and suppress:
        # Exchange marks its automatic replies this way even when the subject is localised
        return "auto-reply (Precedence and X-Auto-Response-Suppress); ignored"
    return None


#: Subjects that only machines write. Wider than `_AUTO_SUBJECT` (which decides "auto-reply,
#: ignored" for bounce accounting and must not swallow a person's mail): here a false match
#: only means a reply is kept for review instead of forwarded.
_MACHINE_SUBJECT = re.compile(r"^\s*(auto:|auto[- ]?reply|automatic reply|out of (the )?office"
                              r"|ooo\b|autosvar|abwesend|absence)", re.IGNORECASE)
_AUTOMATIC_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply"})


def automatic_reason(msg: Message, envelope_sender: str | None = None) -> str | None:
    """Why a message was written by a machine, not a person; None if nothing says so.

    A person's reply is forwarded to the co-ordinators, so everything an autoresponder,
    a mail system or a list server marks is left out: RFC 3834's `Auto-Submitted` (anything
    but `no`), the older `X-Autoreply`/`X-Autorespond`/`X-Autoresponse`, `Precedence: bulk,
    junk, list or auto_reply`, Exchange's `X-Auto-Response-Suppress` and
    `X-MS-Exchange-Inbox-Rules-Loop` (an inbox rule sent it), a List-Id or List-Unsubscribe
    (a list's copy), the null sender (`<>`, in the envelope or as Return-Path), a delivery
    or feedback report, and the subjects of out-of-office replies in several languages.

    >>> import email
    >>> automatic_reason(email.message_from_string("From: a@b.uk\\nSubject: Re: news\\n\\nHi"))
    >>> automatic_reason(email.message_from_string("From: a@b.uk\\nSubject: Automatic reply: "
    ...                                            "news\\n\\nAway"))
    "subject 'Automatic reply: news'"
    """
    if envelope_sender == "" or _header(msg, "Return-Path").strip() in ("<>", "< >"):
        return "null sender"
    if msg.get_content_type() == "multipart/report":
        return "a delivery or feedback report"
    submitted = _header(msg, "Auto-Submitted").split(";")[0].strip().lower()
    if submitted and submitted != "no":
        return f"Auto-Submitted: {submitted}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponse",
                 "X-Auto-Response-Suppress", "X-MS-Exchange-Inbox-Rules-Loop", "List-Id",
                 "List-Unsubscribe", "X-Failed-Recipients"):
        if _header(msg, name):
            return name
    precedence = _header(msg, "Precedence").strip().lower()
    if precedence in _AUTOMATIC_PRECEDENCE:
        return f"Precedence: {precedence}"
    subject = _header(msg, "Subject")
    if _AUTO_SUBJECT.search(subject) or _MACHINE_SUBJECT.search(subject):
        return f"subject {subject.strip()[:60]!r}"
    sender = parseaddr(_header(msg, "From"))[1].lower()
    if not sender or "@" not in sender:
        return "no From address"
    if sender.split("@")[0].startswith(_DAEMONS) or sender.split("@")[0] in (
            "noreply", "no-reply", "donotreply", "do-not-reply"):
        return f"from {sender}"
    return None


# ---- ARF complaints (RFC 5965) ----

_NOT_COMPLAINTS = {"not-spam", "auth-failure", "virus"}


def _arf(msg: Message, common: _Common) -> Verdict:
    fields = _report_fields(_first_part(msg, "message/feedback-report"))
    feedback_type = (fields.get("feedback-type") or "abuse").strip().lower()
    recipient = _addr(fields.get("original-rcpt-to", "")) or _original_recipient(msg)
    reporter = fields.get("user-agent") or fields.get("reported-domain") or ""
    if feedback_type in _NOT_COMPLAINTS:
        return Verdict(Kind.UNKNOWN, f"feedback report of type {feedback_type}: not a complaint",
                       detector="arf", feedback_type=feedback_type, **common)
    failures = (Failure(recipient, Kind.COMPLAINT),) if recipient else ()
    reason = f"complaint (ARF Feedback-Type: {feedback_type}" + (
        f", from {reporter.strip()[:60]})" if reporter else ")")
    return Verdict(Kind.COMPLAINT, reason, failures=failures, detector="arf",
                   feedback_type=feedback_type, **common)


def _report_fields(report: Message | None) -> dict[str, str]:
    if report is None:
        return {}
    # The email package parses an unknown message/* subtype as an embedded message whose
    # "headers" are the report's fields.
    payload = report.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return _block_fields(payload[0])
    return _parse_fields(_text_of(report))


def _original_recipient(msg: Message) -> str:
    """The To of the embedded original: many feedback loops redact it, some keep it."""
    for headers in _original_headers(msg):
        to = _addr(headers.get("To", ""))
        if to and "redacted" not in to.lower():
            return to
    return ""


# ---- RFC 3464 DSNs ----

_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
_CODE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


def _dsn(msg: Message, common: _Common) -> Verdict | None:
    failures: list[Failure] = []
    skipped: list[str] = []
    for part in msg.walk():
        if part.get_content_type() not in _STATUS_TYPES:
            continue
        for block in _status_blocks(part):
            recipient = _dsn_recipient(block)
            if not recipient:
                continue
            action = (block.get("action") or "").strip().lower().split()[0:1]
            action_word = action[0] if action else ""
            status, source = _dsn_status(block)
            diagnostic = _clean(block.get("diagnostic-code", "")) or None
            kind = _kind_for(action_word, status)
            if kind is None:
                skipped.append(f"{recipient} {action_word or 'no action'}")
                continue
            failures.append(Failure(recipient, kind, status, action_word or None, diagnostic,
                                    source))
    if not failures:
        if skipped:
            return Verdict(Kind.UNKNOWN, "delivery report with no failures ("
                           + "; ".join(skipped) + ")", detector="dsn", **common)
        return None  # no readable blocks: let the heuristics try
    kind = Kind.HARD if any(f.kind is Kind.HARD for f in failures) else Kind.SOFT
    worst = next(f for f in failures if f.kind is kind)
    reason = _reason(kind, worst)
    if skipped:
        reason += f" (also: {'; '.join(skipped)})"
    return Verdict(kind, reason, failures=tuple(failures), detector="dsn", **common)


def _dsn_status(block: dict[str, str]) -> tuple[str | None, str | None]:
    status = _code(block.get("status", ""))
    from_diagnostic = _code(block.get("diagnostic-code", ""))
    # Exim and others send a generic `Status: 5.0.0` beside a precise `550 5.1.1` from the
    # remote server; the precise one of the same class is what the policy needs.
    if status and from_diagnostic and status.endswith(".0.0") and \
            from_diagnostic[0] == status[0]:
        return from_diagnostic, "diagnostic"
    if status:
        return status, "status"
    return (from_diagnostic, "diagnostic") if from_diagnostic else (None, None)


def _kind_for(action: str, status: str | None) -> Kind | None:
    """A DSN block's outcome: `Status:` decides, `Action:` where there is no usable Status."""
    if action in ("delivered", "relayed", "expanded"):
        return None
    if action == "delayed":
        return Kind.SOFT
    if status:
        return _kind_of_code(status)
    if action in ("failed", "error") or action.startswith("fail"):
        return Kind.HARD
    return None


def _kind_of_code(status: str) -> Kind | None:
    klass, subject, detail = status.split(".")
    if klass == "2":
        return None
    if klass == "4":
        return Kind.SOFT
    # A full mailbox is temporary in nature whatever class the receiver gives it (Gmail says
    # 5.2.2); suppressing an officer on leave for good would be wrong. AWS SES likewise counts
    # MailboxFull as a transient bounce. The raw code is kept for the policy to overrule.
    if (subject, detail) == ("2", "2"):
        return Kind.SOFT
    return Kind.HARD


def _reason(kind: Kind, failure: Failure) -> str:
    what = {
        ("1", "1"): "no such mailbox", ("1", "10"): "recipient not found",
        ("1", "2"): "no such domain", ("2", "1"): "mailbox disabled", ("2", "2"): "mailbox full",
        ("4", "1"): "no answer from host / recipient rejected", ("4", "4"): "unable to route",
        ("4", "7"): "delivery time expired", ("7", "1"): "rejected by policy",
    }
    text = "temporary failure" if kind is Kind.SOFT else "permanent failure"
    if failure.action == "delayed":
        text = "delivery delayed"
    if failure.status:
        _, subject, detail = failure.status.split(".")
        text += f" {failure.status}"
        if failure.diagnostic:
            text += f": {failure.diagnostic[:100]}"
        elif what.get((subject, detail)):
            text += f" ({what[(subject, detail)]})"
    elif failure.diagnostic:
        text += f": {failure.diagnostic[:100]}"
    return text


def _status_blocks(part: Message) -> Iterator[dict[str, str]]:
    payload = part.get_payload()
    if part.get_content_type() == "message/global-delivery-status":
        # The email package knows only message/delivery-status as a list of blocks; it reads
        # the RFC 6533 global variant as one embedded message: first block as its headers,
        # the other blocks as its body.
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, Message):
            yield _block_fields(inner)
            body = inner.get_payload()
            payload = body if isinstance(body, str) else ""
    elif isinstance(payload, list):
        for block in payload:
            if isinstance(block, Message):
                yield _block_fields(block)
        return
    # Some generators put the status fields in as plain text; parse them ourselves.
    text = payload if isinstance(payload, str) else ""
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text):
        fields = _parse_fields(chunk)
        if fields:
            yield fields


def _dsn_recipient(block: dict[str, str]) -> str:
    # Final-Recipient is the address that failed; Original-Recipient is what we sent to, which
    # is what the store knows. Prefer Original-Recipient when it is present and well-formed.
    for name in ("original-recipient", "final-recipient", "x-actual-recipient"):
        value = block.get(name, "")
        if not value:
            continue
        addr_type, _, address = value.partition(";")
        if not address:
            address, addr_type = addr_type, "rfc822"
        address = address.strip()
        if addr_type.strip().lower() == "utf-8":
            address = _unescape_utf8_addr(address)
        address = _addr(address)
        if address:
            return address
    return ""


def _unescape_utf8_addr(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext/unitext: `\\x{F6}` stands for ö."""
    return re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", lambda m: chr(int(m[1], 16)), text)


# ---- everything else: flufl.bounce's heuristics ----

def _heuristic(msg: Message, common: _Common, envelope_sender: str | None = None) -> Verdict:
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # a detector tripping over odd input is "unknown", not a crash
        log.warning("flufl.bounce failed on a message: %s", exc)
        return Verdict(Kind.UNKNOWN, f"bounce detectors failed ({type(exc).__name__})",
                       detector="error", **common)
    text = _notification_text(msg)
    # A warning that the relay is still trying is a delay, as `Action: delayed` is in a DSN.
    # flufl.bounce's Exim detector reports the addresses of Exim's "message delayed" warning
    # as permanent failures, so the wording is read here too.
    warning = bool(_WARNING.search(_header(msg, "Subject")) or _WARNING.search(text))
    failures: list[Failure] = []
    for raw_addr, default in [(a, Kind.HARD) for a in sorted(permanent)] + [
            (a, Kind.SOFT) for a in sorted(temporary - permanent)]:
        address = raw_addr.decode("ascii", "replace")
        if warning:
            default = Kind.SOFT
        status, source, line = _status_near(text, address, default)
        kind = Kind.SOFT if warning else (_kind_of_code(status) if status else None) or default
        # flufl.bounce's only temporary failures outside DSNs come from its warning detector.
        action = "delayed" if warning or default is Kind.SOFT else None
        failures.append(Failure(address, kind, status, action, line, source))
    if not failures:
        if _looks_like_bounce(msg):
            return Verdict(Kind.UNKNOWN, "looks like a bounce but names no recipient",
                           detector="none", **common)
        if automatic_reason(msg, envelope_sender) is None:
            return Verdict(Kind.REPLY, "a reply from a person", **common)
        return Verdict(Kind.UNKNOWN, "not a bounce, complaint or auto-reply", **common)
    kind = Kind.HARD if any(f.kind is Kind.HARD for f in failures) else Kind.SOFT
    worst = next(f for f in failures if f.kind is kind)
    return Verdict(kind, _reason(kind, worst) + " (non-standard bounce)",
                   failures=tuple(failures), detector="flufl", **common)


#: The wording of delay warnings (Exim, Sendmail, Postfix, qmail's and Exchange's "delayed"):
#: the message has not failed yet.
_WARNING = re.compile(
    r"^\s*warning: (message \S+ delayed|could not send message)|has not yet been delivered"
    r"|this is a warning (message )?only|delivery attempts will continue"
    r"|will (keep|continue) (on )?trying|still being retried|^\s*delivery delayed"
    r"|status notification \(delay\)",
    re.IGNORECASE | re.MULTILINE)


def _notification_text(msg: Message) -> str:
    """The human-readable notice, without the returned original (whose text is not ours to read)."""
    chunks: list[str] = []
    for part in _walk_outside_originals(msg):
        if part.get_content_maintype() == "text" and part.get_content_type() != \
                "text/rfc822-headers":
            chunks.append(_text_of(part))
    text = "\n".join(chunks)
    for marker in ("--- Below this line is a copy of the message", "------ This is a copy of the",
                   "--- Original message follows", "----- Original message -----",
                   "Original message headers:", "--- Enclosed is a copy of the message"):
        head, found, _ = text.partition(marker)
        if found:
            text = head
    return text


#: Wording of the non-standard formats, for when they give no status code. First match wins,
#: so the more specific phrases come first.
_WORDING = (
    (re.compile(r"mailbox (is )?full|over ?quota|quota exceeded|out of storage", re.I), "2.2"),
    (re.compile(r"retry time ?out exceeded|delivery time expired", re.I), "4.7"),
    (re.compile(r"user unknown|unknown user|unknown recipient|no such (user|mailbox)"
                r"|does not exist|doesn't have an? .{0,40}account|not listed in"
                r"|recipient name is not recognized|no mailbox here|invalid recipient", re.I),
     "1.1"),
)


def _status_near(text: str, address: str, kind: Kind) -> tuple[str | None, str | None, str | None]:
    """A status code for a heuristic match: one near the address in the notice, else one
    anywhere in it, else one inferred from the wording; and the line it came from."""
    lines = text.splitlines()
    lowered = address.lower()
    # Each place the address is named, with the few lines after it: the reason follows there.
    windows = [[x.strip() for x in lines[i:i + 6] if x.strip()]
               for i, line in enumerate(lines) if lowered in line.lower()] or [lines]
    for window in windows:
        for line in window:
            if code := _code(line):
                return code, "text", _clean(line)[:200]
    klass = "5" if kind is Kind.HARD else "4"
    for window in windows:
        for line in window:
            for pattern, rest in _WORDING:
                if pattern.search(line):
                    return f"{klass}.{rest}", "inferred", _clean(line)[:200]
    window = windows[0]
    return None, None, _clean(" ".join(window[1:3]))[:200] or None


# ---- the delivery reference ----

_ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
_ORIGINAL_HEADERS = ("Message-ID", "List-Unsubscribe", "Return-Path", "References")
_QUOTED_HEADER = re.compile(
    r"^[>\s]*(message-id|list-unsubscribe|references|return-path)\s*:\s*(.*(?:\n[ \t].*)*)",
    re.IGNORECASE | re.MULTILINE)


def find_reference(
    msg: Message, secret: bytes, envelope_recipients: Sequence[str] = (), *,
    token_keys: Sequence[bytes] = (),
) -> DeliveryRef | None:
    """Our signed delivery reference, from the most to the least trustworthy place it can be;
    failing that, the unsubscribe token of the returned original's List-Unsubscribe.

    A reference or token whose MAC does not verify is ignored, so a forged or mangled one
    finds nothing.
    """
    candidates = list(_reference_candidates(msg, envelope_recipients))
    for source, text in candidates:
        found = parse_delivery_ref(secret, text)
        if found:
            return DeliveryRef(found[0], found[1], source)
    tokens: Tokens | None = None
    for source, text in candidates:
        if not source.endswith(":List-Unsubscribe"):
            continue
        for token in _UNSUBSCRIBE_TOKEN.findall(text):
            try:
                tokens = tokens or Tokens(list(token_keys) or [secret], _READ_ANY_AGE)
                claims = tokens.read(Purpose.UNSUBSCRIBE, token)
            except (InvalidToken, ValueError):
                continue
            return DeliveryRef(None, claims.subscriber_id, f"{source}-token", claims.topic_id)
    return None


#: Our one-click URL is `{base_url}/u/TOKEN` (`mailer.links`); the token is URL-safe base64
#: and dots. Bounded, so a pathological header costs nothing.
_UNSUBSCRIBE_TOKEN = re.compile(r"/u/([A-Za-z0-9_\-]{1,200}\.[A-Za-z0-9_\-]{1,40}"
                                r"\.[A-Za-z0-9_\-]{1,100})(?=[>?#/\s,]|$)")
#: A bounce names a delivery however old the link in it: the token's age is not the point.
_READ_ANY_AGE = Lifetimes(unsubscribe=100 * 365 * 86400)


def _reference_candidates(
    msg: Message, envelope_recipients: Sequence[str]
) -> Iterator[tuple[str, str]]:
    for rcpt in envelope_recipients:
        yield "envelope", rcpt
    for name in _ENVELOPE_HEADERS:
        for value in _header_all(msg, name):
            yield f"header:{name}", value
    for headers in _original_headers(msg):
        for name in _ORIGINAL_HEADERS:
            for value in headers.get_all(name, []):
                yield f"original:{name}", str(value)
    # Auto-replies and Microsoft's NDRs cite our Message-ID here.
    for name in ("In-Reply-To", "References"):
        for value in _header_all(msg, name):
            yield f"header:{name}", value
    for part in _walk_outside_originals(msg):
        if part.get_content_maintype() == "text" and part.get_content_type() != \
                "text/rfc822-headers":
            for match in _QUOTED_HEADER.finditer(_text_of(part)):
                yield f"quoted:{_canonical(match[1])}", match[2]


def _canonical(name: str) -> str:
    return {"message-id": "Message-ID", "list-unsubscribe": "List-Unsubscribe"}.get(
        name.lower(), name.title())


def _original_headers(msg: Message) -> Iterator[Message]:
    """The headers of each returned original: a message/rfc822 part or a text/rfc822-headers."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else payload
            if isinstance(inner, Message):
                yield inner
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers",
                       "message/global-headers"):
            text = _text_of(part)
            try:
                yield email.message_from_string(text.lstrip("\r\n"), policy=policy.default)
            except Exception:  # a mangled header block is simply not a source
                log.debug("unreadable rfc822-headers part", exc_info=True)


def _original_subject(msg: Message) -> str | None:
    for headers in _original_headers(msg):
        try:
            value = _clean(str(headers.get("Subject", "") or ""))
        except Exception:  # an undecodable encoded-word is no subject
            value = ""
        if value:
            return value[:300]
    return None


def _original_message_id(msg: Message) -> str | None:
    for headers in _original_headers(msg):
        value = _clean(str(headers.get("Message-ID", "") or ""))
        if value:
            return value
    for part in _walk_outside_originals(msg):
        if part.get_content_maintype() == "text":
            for match in _QUOTED_HEADER.finditer(_text_of(part)):
                if match[1].lower() == "message-id" and "<" in match[2]:
                    return _clean(match[2])
    return None


# ---- small readers that never raise on odd input ----

def _walk_outside_originals(msg: Message) -> Iterator[Message]:
    """Every part, not descending into a returned original (its text is the newsletter)."""
    stack = [msg]
    while stack:
        part = stack.pop(0)
        yield part
        if part.get_content_type() in ("message/rfc822", "message/global"):
            continue
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            stack[0:0] = [p for p in payload if isinstance(p, Message)]


def _first_part(msg: Message, content_type: str) -> Message | None:
    for part in _walk_outside_originals(msg):
        if part.get_content_type() == content_type:
            return part
    return None


def _text_of(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _block_fields(block: Message) -> dict[str, str]:
    """A header block's fields, lowercased names, first occurrence wins, raw UTF-8 decoded.

    Read from the raw items because the header registry can choke on odd values, and because
    a raw UTF-8 address (RFC 6533) must survive as text.
    """
    fields: dict[str, str] = {}
    for name, value in block.raw_items() if hasattr(block, "raw_items") else block.items():
        fields.setdefault(name.lower(), _undo_surrogates(_unfold(str(value))))
    if not fields:
        return _parse_fields(_text_of(block))
    return fields


def _parse_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for match in re.finditer(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)",
                             text, re.MULTILINE):
        fields.setdefault(match[1].lower(), _unfold(match[2]))
    return fields


def _header(msg: Message, name: str) -> str:
    values = _header_all(msg, name)
    return values[0] if values else ""


def _header_all(msg: Message, name: str) -> list[str]:
    try:
        return [_clean(str(v)) for v in msg.get_all(name, [])]
    except Exception:  # the header registry can raise on malformed values; fall back to raw
        wanted = name.lower()
        return [_clean(_undo_surrogates(str(v))) for k, v in msg.raw_items()
                if k.lower() == wanted]


def _undo_surrogates(text: str) -> str:
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return text


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", text).strip()


def _clean(text: str) -> str:
    return " ".join(_unfold(text).split())


def _addr(text: str) -> str:
    text = text.strip()
    try:
        pairs = getaddresses([text])
    except Exception:
        pairs = []
    for _name, address in pairs:
        if "@" in address:
            return address.strip()
    match = re.search(r"[^\s<>;\"']+@[^\s<>;\"']+", text)
    return match[0] if match else ""


def _code(text: str) -> str | None:
    match = _CODE.search(text or "")
    return ".".join(match.groups()) if match else None
