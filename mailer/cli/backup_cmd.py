"""`mailer backup keygen|create|verify|restore`: the database in one encrypted file, and back."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from mailer import backup
from mailer.cli.runtime import Runtime, console

app = typer.Typer(help="Encrypted backups of the database, and restoring them.",
                  no_args_is_help=True)


def _counts(manifest: backup.Manifest) -> str:
    shown = ("subscriber", "suppression", "edition", "delivery")
    return ", ".join(f"{manifest.row_counts.get(t, 0)} {t}" for t in shown)


@app.command()
def keygen(path: Path = typer.Argument(..., help="Where to write the key (never overwritten)")
           ) -> None:
    """Write a new backup key (32 random bytes, mode 0600) and print its id.

    Example: `mailer backup keygen /etc/mailer/backup.key`, then set MAILER_BACKUP_KEY_FILE to
    it and keep a copy off this host: without the key no backup can be read.
    """
    ident = backup.make_key_file(path)
    console.print(f"wrote the backup key {escape(str(path))} (key id {ident}); set "
                  "MAILER_BACKUP_KEY_FILE to it and keep a copy somewhere safe off this host")


@app.command()
def create(ctx: typer.Context,
           path: Path | None = typer.Argument(
               None, help="The backup file (default: the backup directory, by time)")) -> None:
    """Back the whole database up into one encrypted file, while the worker may be sending.

    Example: `mailer backup create` or `mailer backup create /mnt/backups/before-upgrade.mbak`
    """
    rt: Runtime = ctx.obj
    made = backup.create(rt.settings, path)
    console.print(f"backup {escape(str(made.path))}: {made.size:,} bytes, schema "
                  f"{made.manifest.schema}, {_counts(made.manifest)}")


@app.command()
def verify(ctx: typer.Context, path: Path = typer.Argument(..., help="The backup file")) -> None:
    """Check a backup without touching the database: every byte's authentication, the
    checksum and the dump itself. Exit 1 if anything is wrong.

    Example: `mailer backup verify var/backups/mailer-20270111T020000Z.mbak`
    """
    rt: Runtime = ctx.obj
    manifest = backup.verify(rt.settings, path)
    console.print(f"[green]ok[/]: {manifest.backend} backup taken {manifest.created_at}, "
                  f"schema {manifest.schema}, {_counts(manifest)}")


@app.command()
def restore(ctx: typer.Context, path: Path = typer.Argument(..., help="The backup file"),
            force: bool = typer.Option(False, "--force",
                                       help="Replace a database that already holds data")
            ) -> None:
    """Replace the database with a backup. Refuses a database with data (unless --force) and a
    backup from a newer schema; an older one is upgraded. Every send is left paused.

    Example: `mailer backup restore var/backups/mailer-20270111T020000Z.mbak`
    """
    rt: Runtime = ctx.obj
    done = backup.restore(rt.settings, path, force=force)
    console.print(f"restored the backup taken {done.manifest.created_at}: "
                  f"{_counts(done.manifest)}")
    if done.upgraded_from:
        console.print(f"its schema {done.upgraded_from} was upgraded to the current one")
    if done.released:
        console.print(f"{done.released} message(s) that were being sent at backup time will go "
                      "again, marked as possible duplicates")
    for slug in done.paused:
        console.print(f"[yellow]paused[/] {escape(slug)}: check what went out since the backup, "
                      f"then `mailer edition resume {escape(slug)}`")
