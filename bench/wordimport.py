"""Benchmark the Word import: a generated ~50-page .docx (per page a heading, three paragraphs
with a link, a four-item list and a figures table) through `import_docx`, end to end: package
checks, mammoth, our converter, the edition's validation. Also the sample newsletter with its
photograph. Goal: under 2 s for 50 pages.

Prints the document's size, each stage's median and the whole import's median and worst.

    .venv/bin/python bench/wordimport.py [--pages 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailer import wordimport  # noqa: E402
from mailer.config import Settings  # noqa: E402
from mailer.edition import parse_edition  # noqa: E402
from tests.word_documents import long_docx, sample_docx  # noqa: E402


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm: imports, caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(label: str, data: bytes, settings: Settings, runs: int) -> None:
    result = wordimport.import_docx(data, settings, name="bench.docx")
    print(f"{label}: {len(data) / 1024:.0f} KB .docx, {len(result.source.split()):,} words, "
          f"{result.source.count(chr(10) + '## ')} sections, {len(result.problems)} problems, "
          f"{len(result.media)} pictures")
    members = wordimport.open_package(data, "bench.docx")
    stages = {
        "package checks": lambda: wordimport.open_package(data, "bench.docx"),
        "mammoth": lambda: wordimport._to_html(members, "bench.docx"),
        "validation": lambda: parse_edition(result.source, "bench.md"),
    }
    for stage, fn in stages.items():
        print(f"  {stage:<16} median {statistics.median(timed(fn, runs)) * 1000:7.1f} ms")
    whole = timed(lambda: wordimport.import_docx(data, settings, name="bench.docx"), runs)
    print(f"  {'whole import':<16} median {statistics.median(whole) * 1000:7.1f} ms, "
          f"worst {max(whole) * 1000:.1f} ms over {runs} runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as var:
        settings = Settings(var_dir=Path(var), base_url="https://news.example.org",
                            secret_key="s" * 40, suppression_key="k" * 40)
        measure(f"{args.pages}-page document", long_docx(args.pages), settings, args.runs)
        measure("sample newsletter + photo", sample_docx(), settings, args.runs)


if __name__ == "__main__":
    main()
