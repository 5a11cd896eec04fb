"""Benchmark the edition pipeline on one core: compile once, then personalise + build per recipient.

Prints: compile time per edition (and its stages), personalise-only and personalise + MIME
throughput for N recipients with DKIM off, DKIM throughput with mailer.signing and with dkimpy
(for comparison) and what each spends its time on, the EmailMessage reference build for
comparison, and peak RSS.

    .venv/bin/python bench/render.py [--n 10000] [--dkim-n 2000] [--dkimpy-n 200] [--edition F]
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailer import signing  # noqa: E402
from mailer.config import Settings  # noqa: E402
from mailer.edition import load_edition  # noqa: E402
from mailer.reference import message_id  # noqa: E402
from mailer.render import (  # noqa: E402
    DKIM_HEADERS,
    DkimKey,
    Recipient,
    RecipientUrls,
    build_message,
    build_reference_message,
    compile_edition,
    dkim_sign,
    inline_css,
    mjml_to_html,
    personalise,
)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def rate(label: str, n: int, fn: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    elapsed = time.perf_counter() - start
    per_s = n / elapsed
    print(f"{label:<50} {n:>6} msgs  {elapsed:7.2f} s  {per_s:10,.0f} msgs/s  "
          f"{elapsed / n * 1e6:8.1f} µs/msg")
    return per_s


def dkim_breakdown(sample: bytes, key: DkimKey) -> None:
    """Where mailer.signing's time goes on one message, stage by stage (median of 200)."""
    head, body = sample.split(b"\r\n\r\n", 1)
    canonical = signing.canonical_body(body)
    rsa = signing.rsa_signer(key.private_key_pem)
    # What the RSA step signs: the h= headers, then the ~330-byte signature field without b=.
    signed = b"".join(signing._select(signing._header_fields(head), DKIM_HEADERS)) + b"x" * 330
    stages = {
        "bare-LF check": lambda: sample.count(b"\n") == sample.count(b"\r\n"),
        "canonicalise body": lambda: signing.canonical_body(body),
        "sha256 body": lambda: hashlib.sha256(canonical).digest(),
        "parse + canonicalise headers": lambda: signing._select(signing._header_fields(head),
                                                                DKIM_HEADERS),
        "RSA-2048 sign (incl. sha256 of headers)": lambda: rsa(signed),
    }
    total = median_ms(lambda: signing.sign(sample, b"bench", b"news.example.org",
                                           key.private_key_pem, include_headers=DKIM_HEADERS),
                      200)
    print(f"\nDKIM per message: mailer.signing.sign {total * 1000:.0f} µs")
    parts = 0.0
    for label, fn in stages.items():
        ms = median_ms(fn, 200)
        parts += ms
        print(f"  {label:<40} {ms * 1000:7.0f} µs  {ms / total:4.0%}")
    print(f"  {'rest (split, tags, fold, base64)':<40} {(total - parts) * 1000:7.0f} µs  "
          f"{(total - parts) / total:4.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dkim-n", type=int, default=2000,
                        help="messages signed with mailer.signing (~1 ms each)")
    parser.add_argument("--dkimpy-n", type=int, default=200,
                        help="messages signed with dkimpy (~7 ms each)")
    parser.add_argument("--edition", type=Path,
                        default=ROOT / "editions" / "2020-q3-kent-essex.md")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-render-"))
    settings = Settings(var_dir=tmp, base_url="https://news.example.org",
                        from_address="bulletin@news.example.org", secret_key="s" * 40,
                        suppression_key="k" * 40)
    edition = load_edition(args.edition)
    compiled = compile_edition(edition, settings)
    print(f"edition {args.edition.name}: {len(compiled.html.encode()) / 1024:.1f} KB HTML, "
          f"{len(compiled.text.encode()) / 1024:.1f} KB text, "
          f"warnings: {len(compiled.warnings)}")
    print(f"python {sys.version.split()[0]}\n")

    print(f"compile_edition (Jinja + mjml + premailer + text): "
          f"{median_ms(lambda: compile_edition(edition, settings), 15):.1f} ms median of 15")
    # Catch the MJML the real compile produces, to time each stage on exactly that input.
    import mailer.render as render

    captured: list[str] = []
    render.mjml_to_html = lambda src, where="": captured.append(src) or mjml_to_html(src, where)
    compile_edition(edition, settings)
    render.mjml_to_html = mjml_to_html
    mjml_src = captured[0]
    raw_html = mjml_to_html(mjml_src)
    print(f"  of which mjml2html: {median_ms(lambda: mjml_to_html(mjml_src), 30):.2f} ms, "
          f"premailer: {median_ms(lambda: inline_css(raw_html), 15):.1f} ms\n")

    secret = settings.secret()
    recipients = [Recipient(f"user{i:05d}@example.org", f"Zoë Reader {i}") for i in range(args.n)]
    urls = [RecipientUrls(f"https://news.example.org/u/{hashlib.sha256(b'%d' % i).hexdigest()}",
                          f"https://news.example.org/p/{i:08d}",
                          f"https://news.example.org/archive/2020-q3?r={i}")
            for i in range(args.n)]
    mids = [message_id(secret, 1, i, "news.example.org") for i in range(args.n)]
    compiled.skeleton()  # built once per edition; not part of the per-message figure

    rate("personalise only (html + text)", args.n,
         lambda i: personalise(compiled, recipients[i], urls[i]))
    fast = rate("build_message, DKIM off", args.n,
                lambda i: build_message(compiled, recipients[i], urls[i], message_id=mids[i]))

    key_path = tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key_path), "2048"], check=True,
                   capture_output=True)
    key = DkimKey("bench", "news.example.org", key_path.read_bytes())
    signed = rate("build_message, DKIM on (mailer.signing, RSA-2048)", args.dkim_n,
                  lambda i: build_message(compiled, recipients[i], urls[i], message_id=mids[i],
                                          dkim=key))
    import dkim
    from dkim import crypto

    slow = rate("build_message, DKIM on (dkimpy, RSA-2048)", args.dkimpy_n,
                lambda i: dkim_sign(build_message(compiled, recipients[i], urls[i],
                                                  message_id=mids[i]), key, sign=dkim.sign))
    print(f"{'':<50} mailer.signing is {signed / slow:.1f}x dkimpy")
    rate("build_reference_message (EmailMessage)", 200,
         lambda i: build_reference_message(compiled, recipients[i], urls[i], message_id=mids[i]))

    sample = build_message(compiled, recipients[0], urls[0], message_id=mids[0])
    dkim_breakdown(sample, key)

    pk = crypto.parse_pem_private_key(key.private_key_pem)
    digest = hashlib.sha256(b"x").digest()
    rsa_ms = median_ms(lambda: crypto.RSASSA_PKCS1_v1_5_sign(
        crypto.HASH_ALGORITHMS[b"rsa-sha256"](digest), pk), 50)
    sign_ms = median_ms(lambda: dkim.sign(sample, b"bench", b"news.example.org",
                                          key.private_key_pem, include_headers=DKIM_HEADERS,
                                          canonicalize=(b"relaxed", b"relaxed")), 50)
    print(f"dkimpy: dkim.sign {sign_ms:.2f} ms, of which the pure-Python RSA-2048 "
          f"private-key operation {rsa_ms:.2f} ms ({rsa_ms / sign_ms:.0%})")
    print(f"\nsize of one message: {len(sample) / 1024:.1f} KB")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS: {peak_kb / 1024:.0f} MB (includes {args.n:,} prepared recipients)")
    print(f"\ntargets: >= 10,000 msgs/s without DKIM: {'met' if fast >= 10_000 else 'NOT met'}"
          f" ({fast:,.0f}); >= 500 msgs/s with DKIM: "
          f"{'met' if signed >= 500 else 'NOT met'} ({signed:,.0f})")


if __name__ == "__main__":
    main()
