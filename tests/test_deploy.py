"""The deployment pack: the systemd units pass `systemd-analyze verify` (where systemd-analyze
exists; it is a developer tool here, not a service CI must provide), are hardened as
docs/deploy.md says, and the compose file and the settings template name only real settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mailer.config import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED = "/opt/mailer/.venv/bin/mailer"


def test_there_is_a_unit_for_web_worker_and_scheduler() -> None:
    commands = {re.search(r"^ExecStart=\S+ (\w+)", u.read_text(), re.M).group(1)  # type: ignore[union-attr]
                for u in UNITS}
    assert commands == {"web", "worker", "scheduler"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_each_unit_is_hardened(unit: Path) -> None:
    text = unit.read_text()
    for line in ("User=mailer", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "EnvironmentFile=/etc/mailer/mailer.env", "PrivateTmp=yes", "ProtectHome=yes"):
        assert f"\n{line}\n" in text, f"{unit.name} lacks {line}"
    assert re.search(r"^ReadWritePaths=/var/lib/mailer", text, re.M)
    assert "MAILER_SECRET_KEY" not in text  # secrets live in the EnvironmentFile only


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    # verify checks that ExecStart exists: point it at this checkout's mailer.
    here = Path(sys.executable).parent / "mailer"
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(here)))
    done = subprocess.run([tool, "verify", *[u.name for u in UNITS]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "mailer-" in line]
    assert ours == []  # no warning either: an unknown key or section is a typo


def _names(text: str) -> set[str]:
    return set(re.findall(r"\b(MAILER_[A-Z_]+)", text))


def test_the_templates_name_only_real_settings() -> None:
    real = {f"MAILER_{n.upper()}" for n in Settings.model_fields} | {"MAILER_UPSTREAM"}
    # Part A of issue 16 adds the DKIM settings; until then they are commented out.
    future = {"MAILER_DKIM_KEY_FILE", "MAILER_DKIM_SELECTOR", "MAILER_DKIM_DOMAIN"}
    for name in ("mailer.env.example", "compose.yaml", "Caddyfile"):
        assert _names((DEPLOY / name).read_text()) - real - future == set(), name


def test_the_compose_file_runs_postgres_and_the_three_services() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"db", "web", "worker", "scheduler", "caddy"} <= set(services)
    assert services["db"]["image"].startswith("postgres:")
    assert services["worker"]["command"] == ["mailer", "worker"]
    for name in ("web", "worker", "scheduler"):
        assert "postgresql://" in services[name]["environment"]["MAILER_DATABASE_URL"]
        assert ":" not in services[name]["environment"]["MAILER_DATABASE_URL"].split("@")[0][13:]
