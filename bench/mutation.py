"""Mutation testing of the code that protects people and messages: plant small bugs (a
comparison flipped, a guard dropped, a constant changed, a call removed) and count how many the
tests catch. Prints the score per module and every surviving mutant with its diff.

Not part of the default test command: it runs the covering tests once per mutant, which takes
hours for every module. Run it before reshaping these modules, and monthly (README).

    export MAILER_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/mutation.py                      # every module below
    .venv/bin/python bench/mutation.py --module tokens --module worker
    .venv/bin/python bench/mutation.py --module tokens --survivors  # after new tests
    .venv/bin/python bench/mutation.py --report             # the last results, run nothing

The tool is mutmut 3 (configured in pyproject.toml's [tool.mutmut]); it works in mutants/
(git-ignored). Which functions of each module are measured is `SCOPE` below: mutmut's
mutant-name selection, so no source file carries pragmas. Mutants that cannot change behaviour
are listed with the reason in bench/mutation-equivalent.toml and left out of the denominator.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = "mutmut==3.8.1"  # pinned: its mutant names (our equivalents file) depend on it
EQUIVALENT = ROOT / "bench" / "mutation-equivalent.toml"
KILLED = {1, 3, 24, -24, 152, 255, 36, 37}  # failed, errored, timed out, caught by types
SKIPPED = {34}

# module name -> (source path, the functions measured: None for the whole file). Functions are
# mutmut's names: `f` for a function, `Class.f` for a method.
SCOPE: dict[str, tuple[str, list[str] | None]] = {
    "tokens": ("subscribers/tokens.py", None),
    "rules": ("subscribers/rules.py", None),
    "validation": ("subscribers/validation.py", [
        "normalise_address", "_mixed_scripts", "normalise_text", "vocabulary_value",
        "email_hmac", "is_trusted_domain"]),
    # the suppression and status guards
    "store": ("subscribers/store.py", [
        "is_suppressed", "subscribe", "confirm", "approve", "reject", "add_active",
        "unsubscribe", "unsubscribe_ids", "_leave", "_suppress", "mark_bounced",
        "mark_complained", "_mark", "erase", "segment", "is_sendable", "sendable_among",
        "suppressed_among", "find", "pause", "not_paused"]),
    # the retry and rate policy, the claim and the recording of results
    "worker": ("mailer/worker.py", [
        "Summary.add", "Policy.from_settings", "Policy.backoff", "Policy.decide",
        "sqlite_lock_path", "Worker._allowance", "Worker._record", "Worker._envelope_from"]),
    # the claim and result guards, pause, cancel and resend (`_due` builds the claim's
    # statements at import, before mutmut can switch a mutant on: claim_due's tests cover it)
    "outbox": ("mailer/outbox.py", [
        "set_status", "halt", "requeue_failed", "release_orphans", "claim_due",
        "record", "finish_done", "next_due_at", "attempts_since", "_require_approved",
        "approve", "check_send_at"]),
    "bounce_policy": ("mailer/bounce_policy.py", [
        "BouncePolicy.from_settings", "BouncePolicy.event_kind", "_decide", "_targets",
        "_same_address", "_worst", "settle", "_settle_one", "_judge", "_judge_soft",
        "_domain_alert", "_act"]),
    # leadership and "not after"
    "schedule": ("mailer/schedule.py", [
        "_start_scheduled", "check_late_reminders", "FileLeaderLock.acquire",
        "FileLeaderLock.check", "FileLeaderLock.release", "PgLeaderLock._acquire",
        "PgLeaderLock._check", "PgLeaderLock._release", "leader_lock", "Scheduler._lead"]),
    # passwords, sessions, API tokens, lock-out
    "accounts": ("mailer/accounts.py", [
        "Actor.can", "Actor.covers", "_check_password", "disable_user", "set_password",
        "totp_match", "authenticate", "_failed", "start_session", "session_user",
        "end_session", "create_token", "token_actor", "revoke_token"]),
    # the recipient pages behind the links we mail
    "public": ("mailer/web/public.py", [
        "csrf_refusal", "_bad_link", "_link_form", "confirm_page", "confirm_post",
        "_unsubscribed_generic", "unsubscribe_page", "_unsubscribed_page", "_one_click_answer",
        "unsubscribe_post",
        "preferences_page", "_not_active_page"]),
    # the header and escaping code
    "render": ("mailer/render.py", [
        "personalise", "_slot_values", "_check_header_text", "_check_unsubscribe_url",
        "list_unsubscribe", "_format_to", "_encoded_word", "_fold"]),
}


def dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def mangled(module: str, function: str) -> str:
    """mutmut's name for a function's mutants, less the `__mutmut_N` suffix."""
    if "." in function:
        cls, name = function.split(".")
        return f"{dotted(SCOPE[module][0])}.xǁ{cls}ǁ{name}"
    return f"{dotted(SCOPE[module][0])}.x_{function}"


def patterns(module: str) -> list[str]:
    path, functions = SCOPE[module]
    if functions is None:
        return [f"{dotted(path)}.*"]
    return [f"{mangled(module, f)}__mutmut_*" for f in functions]


def in_scope(module: str, mutant: str) -> bool:
    return any(fnmatch.fnmatchcase(mutant, p) for p in patterns(module))


def equivalents() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour."""
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text("utf-8"))
    return {name: entry["reason"] for name, entry in data.get("mutant", {}).items()}


@dataclass
class Score:
    killed: int = 0
    survived: list[str] = field(default_factory=list)
    equivalent: int = 0
    unchecked: int = 0

    @property
    def total(self) -> int:
        return self.killed + len(self.survived)


def score(module: str, equivalent: dict[str, str]) -> Score:
    meta = ROOT / "mutants" / (SCOPE[module][0] + ".meta")
    result = Score()
    if not meta.exists():
        return result
    codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
    for name, code in sorted(codes.items(), key=lambda kv: _natural(kv[0])):
        if not in_scope(module, name) or code in SKIPPED:
            continue
        if name in equivalent:
            result.equivalent += 1
        elif code is None:
            result.unchecked += 1
        elif code in KILLED:
            result.killed += 1
        else:  # survived, no test covers it, or suspicious
            result.survived.append(name)
    return result


def _natural(name: str) -> tuple[str, int]:
    base, _, n = name.rpartition("__mutmut_")
    return base, int(n) if n.isdigit() else 0


def ensure_mutmut() -> Path:
    if importlib.util.find_spec("mutmut") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", MUTMUT], check=True)
    return Path(sys.executable).with_name("mutmut")


def kept_template() -> str:
    """The name of the migrated PostgreSQL template every mutant's test session clones (see
    tests/conftest.py): one per set of migrations, instead of one migration per mutant."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "alembic" / "versions").glob("*.py")):
        digest.update(path.read_bytes())
    return f"mailer_tmpl_mutation_{digest.hexdigest()[:12]}"


def drop_template(name: str) -> None:
    from sqlalchemy import create_engine, text

    sys.path.insert(0, str(ROOT))
    from subscribers.db import normalise_url

    admin = create_engine(normalise_url(os.environ["MAILER_TEST_POSTGRES_URL"]),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run(modules: list[str], max_children: int | None, survivors: bool = False) -> float:
    tool = ensure_mutmut()
    if survivors:  # after writing tests: only what the last run left alive, by name
        equivalent = equivalents()
        names = [n for m in modules for n in score(m, equivalent).survived]
        if not names:
            return 0.0
    else:
        names = [p for m in modules for p in patterns(m)]
    command = [str(tool), "run", *names]
    if max_children:
        command[2:2] = ["--max-children", str(max_children)]
    start = time.monotonic()
    template = kept_template()
    # mutmut prints a spinner per mutant; only its end matters here.
    try:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False,
                              env={**os.environ, "MAILER_TEST_PG_TEMPLATE": template})
    finally:
        drop_template(template)
    tail = [line for line in done.stdout.replace("\r", "\n").splitlines()
            if line.strip() and not line.lstrip().startswith(tuple("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"))]
    if done.returncode != 0:
        print("\n".join(tail[-40:]))
        sys.exit(f"mutmut failed (exit {done.returncode}); its output is above")
    return time.monotonic() - start


def diff(tool: Path, mutant: str) -> str:
    shown = subprocess.run([str(tool), "show", mutant], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout
    return "\n".join(line for line in shown.splitlines() if not line.startswith("# "))


def report(modules: list[str]) -> bool:
    tool = ensure_mutmut()
    equivalent = equivalents()
    print(f"{'module':<14} {'killed':>7} {'total':>6} {'score':>7}  equivalent  not run")
    scores = {m: score(m, equivalent) for m in modules}
    for m, s in scores.items():
        pct = f"{100 * s.killed / s.total:.1f}%" if s.total else "-"
        print(f"{m:<14} {s.killed:>7} {s.total:>6} {pct:>7}  {s.equivalent:>10}  {s.unchecked:>7}")
    print(f"(equivalent mutants, listed with their reasons in {EQUIVALENT.relative_to(ROOT)}, "
          "are left out of the totals)")
    for m, s in scores.items():
        for name in s.survived:
            print(f"\n--- survived: {m} {name.rpartition('.')[2]}")
            print(diff(tool, name))
    return all(s.total and s.killed / s.total >= 0.9 for s in scores.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=sorted(SCOPE),
                        help="only this module (repeatable); default: all")
    parser.add_argument("--report", action="store_true", help="print the last results only")
    parser.add_argument("--survivors", action="store_true",
                        help="run again only the mutants the last run left alive")
    parser.add_argument("--max-children", type=int, help="parallel mutants (default: CPUs)")
    args = parser.parse_args()
    modules = args.module or list(SCOPE)
    if not args.report:
        if not os.environ.get("MAILER_TEST_POSTGRES_URL"):
            sys.exit("set MAILER_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1:5432/"
                     "test): the PostgreSQL tests are part of the net")
        seconds = run(modules, args.max_children, args.survivors)
        print(f"mutmut ran {', '.join(modules)} in {seconds / 60:.1f} min")
    sys.exit(0 if report(modules) else 1)


if __name__ == "__main__":
    main()
