"""The import direction of docs/design.md: data flows one way, and the layers say so.

`subscribers` never imports `mailer`; the leaves (edition, render, smtp, reference, bounces,
inbound) touch no database; nothing below the top layer imports the web, the CLI or the
scheduler.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"mailer.edition", "mailer.render", "mailer.smtp", "mailer.reference",
          "mailer.bounces", "mailer.inbound", "mailer.errors", "mailer.config", "mailer.signing",
          "mailer.dkim", "mailer.spf", "mailer.outgoing"}
# The doctor looks at everything (the scheduler's leader lock too), and nothing looks at it.
TOP = ("mailer.web", "mailer.cli", "mailer.schedule", "mailer.demo", "mailer.__main__",
       "mailer.doctor")
DATABASE = ("sqlalchemy", "subscribers.db", "subscribers.store", "mailer.outbox",
            "mailer.models", "alembic")


def _modules() -> dict[str, set[str]]:
    found = {}
    for package in ("mailer", "subscribers"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            name = name.removesuffix(".__init__")
            imports = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imports.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imports.add(node.module)
                    imports.update(f"{node.module}.{alias.name}" for alias in node.names)
            found[name] = imports
    return found


MODULES = _modules()


def _offenders(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {i}" for m in modules for i in MODULES[m]
                  if any(i == f or i.startswith(f + ".") for f in forbidden))


def test_subscribers_never_imports_mailer() -> None:
    assert _offenders([m for m in MODULES if m.startswith("subscribers")], ("mailer",)) == []


def test_the_leaves_touch_no_database() -> None:
    assert _offenders(sorted(LEAVES & set(MODULES)), DATABASE) == []


def test_nothing_below_the_top_layer_imports_it() -> None:
    lower = [m for m in MODULES if not m.startswith(TOP)]
    assert _offenders(lower, TOP) == []


def test_the_web_does_not_reach_into_the_cli() -> None:
    """The CLI starts the web app (`mailer web`, `run`, `demo`); the web never needs the CLI:
    what both use belongs in the library."""
    web = [m for m in MODULES if m.startswith("mailer.web")]
    assert _offenders(web, ("mailer.cli",)) == []
