"""Operator commands on a fresh embedded data directory: migrate, register, list, disable, rotate, verify."""

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fhir.resources.R4B.auditevent import AuditEvent
from jwt.algorithms import ECAlgorithm
from typer.testing import CliRunner

from gateway.audit import CLIENT_MANAGEMENT
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


# --- client management: list, rotate-secret, set-jwks, and the audit of every command ------------

TOKEN_URL = "http://127.0.0.1:8080/auth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _invoke(alliance: CliRunner, *args: str) -> Any:
    return alliance.invoke(app, list(args))


def _create(alliance: CliRunner, *extra: str, org: str = "Organization/thc-xikou") -> dict[str, Any]:
    created = _invoke(alliance, "client", "create", "--org", org, "--scope", "system/*.rs", *extra)
    assert created.exit_code == 0, created.output
    return json.loads(created.stdout)


def _token_status(form: dict[str, str], auth: tuple[str, str] | None = None) -> int:
    """Ask the token endpoint of a gateway on the same data directory, as a HIS would."""
    from gateway.app import create_gateway_app
    from servicekit.settings import AllianceSettings

    async def ask() -> int:
        gateway = create_gateway_app(AllianceSettings())
        async with gateway.router.lifespan_context(gateway), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://127.0.0.1:8080"
        ) as http:
            response = await http.post("/auth/token", data={"grant_type": "client_credentials",
                                                            "scope": "system/Patient.rs", **form}, auth=auth)
            return response.status_code

    return asyncio.run(ask())


def _key(kid: str) -> tuple[Any, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP384R1())
    public = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return private, {**public, "kid": kid, "alg": "ES384", "use": "sig"}


def _assertion(private: Any, kid: str, client_id: str) -> dict[str, str]:
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 240,
              "jti": uuid.uuid4().hex}
    assertion = jwt.encode(claims, private, algorithm="ES384", headers={"kid": kid})
    return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}


def _audit_events() -> list[dict[str, Any]]:
    from sqlalchemy import select

    from fhirkit.store.tables import resource
    from servicekit.db import Database
    from servicekit.settings import AllianceSettings

    async def read() -> list[dict[str, Any]]:
        database = Database(AllianceSettings().database_url("platform"))
        await database.start()
        try:
            async with database.transaction(write=False) as conn:
                rows = await conn.execute(select(resource.c.content).where(resource.c.resource_type == "AuditEvent"))
                return [json.loads(row[0]) for row in rows]
        finally:
            await database.stop()

    return asyncio.run(read())


def _client_actions(events: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    """(action, client id, outcome) of every client-management AuditEvent, in the order written."""
    found = []
    for event in sorted(events, key=lambda e: e["recorded"]):
        codes = {c["system"]: c["code"] for c in event["subtype"]}
        if CLIENT_MANAGEMENT in codes:
            client = next((e["what"]["identifier"]["value"] for e in event.get("entity", [])
                           if "identifier" in e["what"]), None)
            found.append((codes[CLIENT_MANAGEMENT], client, event["outcome"]))
    return found


def test_clients_are_listed(alliance: CliRunner) -> None:
    secret_client = _create(alliance, "--client-id", "his-1", "--name", "乡镇HIS")
    jwks_file = Path(os.environ["ALLIANCE_DATA_DIR"]) / "keys.json"
    jwks_file.write_text(json.dumps({"keys": [_key("k1")[1]]}))
    _create(alliance, "--client-id", "lis-1", "--jwks", str(jwks_file), org="Organization/county-lab")
    assert _invoke(alliance, "client", "disable", "lis-1").exit_code == 0
    assert _token_status({}, auth=("his-1", secret_client["client_secret"])) == 200

    listed = _invoke(alliance, "client", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["client_id"]: row for row in json.loads(listed.stdout)}
    assert rows["his-1"]["organization"] == "Organization/thc-xikou" and rows["his-1"]["enabled"] is True
    assert rows["his-1"]["auth_methods"] == ["client_secret"] and rows["his-1"]["last_used_at"] is not None
    assert rows["lis-1"]["auth_methods"] == ["private_key_jwt"] and rows["lis-1"]["enabled"] is False
    assert rows["lis-1"]["last_used_at"] is None and rows["lis-1"]["created_at"]
    assert "secret" not in json.dumps(rows).replace("client_secret", "")  # no secret or hash is listed

    table = _invoke(alliance, "client", "list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["CLIENT", "ORGANIZATION", "ENABLED", "AUTH", "CREATED", "LAST", "USED"]
    assert any(line.startswith("lis-1") and " no " in line for line in lines)


def test_rotating_a_secret_ends_the_old_one(alliance: CliRunner) -> None:
    old = _create(alliance, "--client-id", "his-2")["client_secret"]
    assert _token_status({}, auth=("his-2", old)) == 200
    rotated = _invoke(alliance, "client", "rotate-secret", "his-2")
    assert rotated.exit_code == 0, rotated.output
    new = json.loads(rotated.stdout)["client_secret"]
    assert new != old and len(new) >= 32
    assert _token_status({}, auth=("his-2", old)) == 401
    assert _token_status({}, auth=("his-2", new)) == 200
    assert _invoke(alliance, "client", "rotate-secret", "no-such-client").exit_code == 1


def test_a_key_only_client_gets_no_secret_by_rotation(alliance: CliRunner) -> None:
    jwks_file = Path(os.environ["ALLIANCE_DATA_DIR"]) / "keys.json"
    jwks_file.write_text(json.dumps({"keys": [_key("k1")[1]]}))
    _create(alliance, "--client-id", "lis-2", "--jwks", str(jwks_file))
    refused = _invoke(alliance, "client", "rotate-secret", "lis-2")
    assert refused.exit_code == 1 and "private_key_jwt" in refused.output


def test_replacing_the_keys_ends_the_old_ones(alliance: CliRunner) -> None:
    data = Path(os.environ["ALLIANCE_DATA_DIR"])
    (old_private, old_public), (new_private, new_public) = _key("old"), _key("new")
    (data / "old.json").write_text(json.dumps({"keys": [old_public]}))
    (data / "new.json").write_text(json.dumps({"keys": [new_public]}))
    _create(alliance, "--client-id", "lis-3", "--jwks", str(data / "old.json"))
    assert _token_status(_assertion(old_private, "old", "lis-3")) == 200

    replaced = _invoke(alliance, "client", "set-jwks", "lis-3", str(data / "new.json"))
    assert replaced.exit_code == 0, replaced.output
    assert _token_status(_assertion(old_private, "old", "lis-3")) == 401
    assert _token_status(_assertion(new_private, "new", "lis-3")) == 200

    (data / "private.json").write_text(json.dumps({"keys": [{**new_public, "d": "secret"}]}))
    (data / "broken.json").write_text("{not json")
    for bad in ("private.json", "broken.json"):
        refused = _invoke(alliance, "client", "set-jwks", "lis-3", str(data / bad))
        assert refused.exit_code == 1, refused.output
    assert _invoke(alliance, "client", "set-jwks", "nobody", str(data / "new.json")).exit_code == 1


def test_every_client_command_is_audited(alliance: CliRunner) -> None:
    data = Path(os.environ["ALLIANCE_DATA_DIR"])
    (data / "keys.json").write_text(json.dumps({"keys": [_key("k")[1]]}))
    secret = _create(alliance, "--client-id", "his-4")["client_secret"]
    _invoke(alliance, "client", "list")
    _invoke(alliance, "client", "disable", "his-4")
    _invoke(alliance, "client", "enable", "his-4")
    rotated = json.loads(_invoke(alliance, "client", "rotate-secret", "his-4").stdout)["client_secret"]
    _invoke(alliance, "client", "set-jwks", "his-4", str(data / "keys.json"))
    _invoke(alliance, "client", "disable", "ghost")
    bad = _invoke(alliance, "client", "create", "--org", "Patient/1", "--scope", "system/*.rs", "--client-id", "bad-1")
    assert bad.exit_code == 1

    events = _audit_events()
    assert _client_actions(events) == [
        ("create", "his-4", "0"), ("list", None, "0"), ("disable", "his-4", "0"), ("enable", "his-4", "0"),
        ("rotate-secret", "his-4", "0"), ("set-jwks", "his-4", "0"), ("disable", "ghost", "4"),
        ("create", "bad-1", "4"),
    ]
    for event in events:
        AuditEvent.model_validate(event)
        raw = json.dumps(event)
        assert secret not in raw and rotated not in raw
    changed = next(e for e in events if {"system": CLIENT_MANAGEMENT, "code": "rotate-secret"} in e["subtype"])
    assert changed["type"]["code"] == "110113" and changed["action"] == "U"
    assert changed["agent"][0]["who"]["identifier"]["system"].endswith("/sid/os-user")
    # The client's organization is named, so that its auditors see what was done to its clients.
    assert {"reference": "Organization/thc-xikou"} in [e["what"] for e in changed["entity"]]


# --- reindex-dates: the date index follows a change of ALLIANCE_TIME_ZONE -----------------------

def _birth_date_lows(data_dir: Path) -> list[int]:
    import sqlite3

    with sqlite3.connect(data_dir / "directory.db") as db:
        return [row[0] for row in db.execute(
            "SELECT low FROM fhir_date_index WHERE resource_type = 'Patient' AND param = 'birthdate' ORDER BY rid")]


def test_reindex_dates_reads_zone_less_dates_in_the_configured_zone(
    alliance: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = alliance.invoke(app, ["demo", "load"])
    assert loaded.exit_code == 0, loaded.output
    in_beijing = _birth_date_lows(tmp_path)
    assert in_beijing, "the demo alliance has patients with birth dates"
    monkeypatch.setenv("ALLIANCE_TIME_ZONE", "UTC")
    reindexed = alliance.invoke(app, ["reindex-dates", "--service", "directory"])
    assert reindexed.exit_code == 0, reindexed.output
    assert "recomputed in UTC" in reindexed.output
    # A birth date starts at local midnight: 16:00 UTC the day before in +08:00, 00:00 in UTC.
    assert [low - earlier for low, earlier in zip(_birth_date_lows(tmp_path), in_beijing)] == \
        [8 * 3600 * 1_000_000] * len(in_beijing)
    unknown = alliance.invoke(app, ["reindex-dates", "--service", "pharmacy"])
    assert unknown.exit_code != 0
