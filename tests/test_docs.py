"""The README lists every setting and every command, so the docs cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

import typer

from mailer.cli import app
from mailer.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _commands(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = getattr(group, "commands", None)
    if not subs:
        return [prefix]
    return [path for name, sub in sorted(subs.items()) for path in _commands(sub, (*prefix, name))]


def test_every_setting_is_in_the_readme() -> None:
    missing = [f"MAILER_{name.upper()}" for name in Settings.model_fields
               if f"MAILER_{name.upper()}" not in README]
    assert missing == []


def test_every_command_is_in_the_readme() -> None:
    lines = README.splitlines()
    missing = []
    for path in _commands(typer.main.get_command(app)):
        *group, name = path
        head = " ".join(("mailer", *group))
        full = f"{head} {name}"
        if not any(full in line or (f"`{head}" in line and f"`{name}`" in line)
                   for line in lines):
            missing.append(full)
    assert missing == []


def test_every_command_has_help() -> None:
    def walk(command: object, path: str) -> list[str]:
        subs = getattr(command, "commands", None)
        if subs:
            return [p for n, c in subs.items() for p in walk(c, f"{path} {n}")]
        return [] if (getattr(command, "help", None) or "").strip() else [path]

    assert walk(typer.main.get_command(app), "mailer") == []
