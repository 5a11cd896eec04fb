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
          "mailer.media", "mailer.wordimport", "mailer.dkim", "mailer.spf", "mailer.outgoing",
          "mailer.edition_form", "mailer.charts", "mailer.marking"}
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


# ---- the faces: parse, call an operation, render (docs/design.md, "faces -> operations") ----

FACES = ("mailer.web", "mailer.cli")
# The library modules that own tables: a face may read through them for display, never write.
STORES = ("subscribers.store", "subscribers.importer", "mailer.outbox", "mailer.accounts",
          "mailer.audit", "mailer.events", "mailer.bounce_policy", "mailer.alerts",
          "mailer.privacy", "mailer.revisions", "mailer.retention", "mailer.replies",
          "mailer.segments")
# What a face may use of them: reads for display, and types and constants.
READS = {
    "subscribers.store": {"list_topics", "find", "find_by_email", "topic_by_id",
                          "active_topics", "ping", "counts", "Context", "SubscribeOutcome",
                          "SORTS"},
    "subscribers.importer": {"Options", "ImportReport"},
    "mailer.outbox": {"Progress", "progress", "eta_text", "time_left_text",
                      "second_pair_of_eyes", "audience_breakdown", "published",
                      "published_compiled", "Published", "ApprovalRefused", "LONDON", "figures",
                      "uk_time", "left_out", "own_copy", "own_copies"},
    "mailer.audit": {"AuditFilter", "entries", "actions", "as_dict"},
    "mailer.events": {"list_events", "next_occurrence", "upcoming", "get_event",
                      "reminders_for", "load_file", "EventSpec", "EventError",
                      "DEFAULT_SEND_TIME", "PLAN_HORIZON_DAYS", "Event",
                      "parse_date", "parse_offsets"},
    "mailer.accounts": {"list_tokens", "list_users", "Actor", "Permission", "Role",
                        "LoginOutcome", "SESSION_LIFETIME"},
    "mailer.bounce_policy": {"recent", "events_for", "open_alerts", "event_counts",
                             "BouncePolicy",
                             "Decision", "Outcome", "Purged"},
    "mailer.alerts": {"recent"},
    "mailer.replies": {"own_addresses"},
    "mailer.privacy": set(),
    "mailer.revisions": set(),
    "mailer.retention": {"Holding", "Periods", "Purged"},
    "mailer.segments": {"AudienceFields", "SavedSegment"},
}
# The system's own machinery, which commands start (the bounce receiver and its retention,
# the alert mailer, the reminder planner): no co-ordinator decides these, so they are no
# operation's business.
MACHINERY = {
    "mailer.bounce_policy": {"receive", "settle", "purge"},
    "mailer.alerts": {"mail_pending"},
    "mailer.replies": {"forward_pending"},
    "mailer.events": {"plan_reminders"},
    "mailer.retention": {"run_due"},
}


def _face_modules() -> list[tuple[str, ast.Module]]:
    out = []
    for package in ("web", "cli"):
        for path in sorted((ROOT / "mailer" / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out.append((name.removesuffix(".__init__"), ast.parse(path.read_text("utf-8"))))
    return out


def _project(module: str) -> bool:
    return module.split(".")[0] in ("mailer", "subscribers")


def test_no_face_imports_a_private_name_of_another_module() -> None:
    found = []
    for name, tree in _face_modules():
        aliases = {}  # local name -> a project module imported whole
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and _project(node.module):
                for alias in node.names:
                    if alias.name.startswith("_") and node.module != name:
                        found.append(f"{name}: from {node.module} import {alias.name}")
                    whole = f"{node.module}.{alias.name}"
                    if whole in MODULES:
                        aliases[alias.asname or alias.name] = whole
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _project(alias.name):
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert found == []


def test_faces_change_data_only_through_the_operations() -> None:
    """Every name a face takes from a module that owns tables is a read for display, a type or
    a constant (READS), or the system's own machinery (MACHINERY): a change goes through
    `mailer.operations`, which checks, scopes and audits it once for every face."""
    found = []
    for name, tree in _face_modules():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    whole = f"{node.module}.{alias.name}"
                    if whole in STORES:
                        aliases[alias.asname or alias.name] = whole
                    elif node.module in STORES:  # a name taken from a store module directly
                        used = alias.name
                        allowed = READS[node.module] | MACHINERY.get(node.module, set())
                        if used not in allowed:
                            found.append(f"{name}: {node.module}.{used}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in STORES:
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                module = aliases[node.value.id]
                allowed = READS[module] | MACHINERY.get(module, set())
                if node.attr not in allowed:
                    found.append(f"{name}: {module}.{node.attr}")
    assert sorted(set(found)) == []


def test_the_operations_import_no_face() -> None:
    operations = [m for m in MODULES if m.startswith("mailer.operations")]
    assert operations and _offenders(operations, (*FACES, "mailer.schedule")) == []
