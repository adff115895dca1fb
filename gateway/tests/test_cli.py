"""Operator commands on a fresh embedded data directory: migrate, register, disable, verify."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app

SECRETS = {"ALLIANCE_INTERNAL_SECRET": "cli-internal-secret-0123456789abcdef0123456789",
           "ALLIANCE_TOKEN_SIGNING_KEY": "cli-token-signing-key-0123456789abcdef012345"}


@pytest.fixture
def alliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name, value in {**SECRETS, "ALLIANCE_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    migrated = runner.invoke(app, ["migrate"])
    assert migrated.exit_code == 0, migrated.output
    return runner


def test_a_client_can_be_disabled_and_enabled_again(alliance: CliRunner) -> None:
    created = alliance.invoke(app, ["client", "create", "--org", "Organization/thc-xikou", "--scope", "system/*.rs"])
    assert created.exit_code == 0, created.output
    client_id = json.loads(created.output)["client_id"]
    disabled = alliance.invoke(app, ["client", "disable", client_id])
    assert disabled.exit_code == 0 and "disabled" in disabled.output
    assert alliance.invoke(app, ["client", "enable", client_id]).exit_code == 0
    unknown = alliance.invoke(app, ["client", "disable", "no-such-client"])
    assert unknown.exit_code == 1


def test_audit_verify_on_an_empty_trail(alliance: CliRunner) -> None:
    verified = alliance.invoke(app, ["audit", "verify"])
    assert verified.exit_code == 0 and "ok: 0 AuditEvents" in verified.output
