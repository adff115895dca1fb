"""The wiring in `create_service_app`: every write of a service's types reaches its consumers,
the event lineage is migrated with every service, and one bus serves every app of a process."""

import gc
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from servicekit.app import ServiceDefinition, create_service_app
from servicekit.events import EVENTS_LINEAGE, InProcessBus
from servicekit.events.nats_bus import NatsBus
from servicekit.events.testing import (
    NATS_URL,
    Recorder,
    bus_params,
    drop_bus,
    effects,
    migrate,
    wait_for,
)
from servicekit.identity import IDENTITY_HEADER, sign_identity
from servicekit.peers import SYSTEM_IDENTITY
from servicekit.settings import AllianceSettings

BUSES = bus_params()
SECRET = "test-internal-secret-0123456789abcdef0123456789"


def _settings(data_dir: Path, **extra: object) -> AllianceSettings:
    return AllianceSettings(
        data_dir=data_dir,
        internal_secret=SECRET,
        token_signing_key=SECRET,
        log_json=False,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("bus_kind", BUSES)
async def test_a_service_app_delivers_its_writes_to_the_consumers_it_subscribed(
    tmp_path: Path, bus_kind: str
) -> None:
    recorder = Recorder("app-trail")

    async def subscribe(app: FastAPI) -> None:
        await app.state.events.subscribe("app-trail", "directory.Patient.*", recorder)

    definition = ServiceDefinition(
        name="directory", title="test", resource_types=frozenset({"Patient"}), on_startup=[subscribe]
    )
    assert EVENTS_LINEAGE in definition.all_lineages
    nats: dict[str, object] = {}
    if bus_kind == "nats":
        tag = uuid.uuid4().hex[:10]
        nats = {
            "nats_url": NATS_URL,
            "nats_stream": f"TEST_APP_{tag}",
            "nats_subject_prefix": f"test.{tag}.events",
        }
    settings = _settings(tmp_path, events_poll_interval_seconds=30.0, **nats)  # only the commit wakes it
    migrate(settings.database_url("directory"), definition.all_lineages)
    app = create_service_app(definition, settings)
    headers = {
        IDENTITY_HEADER: sign_identity(SYSTEM_IDENTITY, SECRET.encode()),
        "Content-Type": "application/fhir+json",
    }

    async with app.router.lifespan_context(app):
        assert isinstance(app.state.bus, NatsBus if bus_kind == "nats" else InProcessBus)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://directory"
        ) as client:
            created = await client.post(
                "/fhir/Patient",
                content=orjson.dumps({"resourceType": "Patient"}),
                headers={**headers, "X-Request-ID": "trace-create"},
            )
            assert created.status_code == 201, created.text
            patient_id = created.json()["id"]
            deleted = await client.delete(
                f"/fhir/Patient/{patient_id}", headers={**headers, "X-Request-ID": "trace-delete"}
            )
            assert deleted.status_code in (200, 204)
        await wait_for(lambda: _handled(app, 2), timeout=5)
        handled = await effects(app.state.database, "app-trail")
        async with app.state.database.transaction(write=False) as conn:
            traced = [
                row[0]
                for row in await conn.execute(text("SELECT request_id FROM servicekit_outbox ORDER BY seq"))
            ]

    await drop_bus(app.state.bus)
    assert [(row["subject"], row["version_id"]) for row in handled] == [
        ("directory.Patient.create", 1),
        ("directory.Patient.delete", 2),
    ]
    assert traced == ["trace-create", "trace-delete"]


def test_apps_built_from_one_settings_object_share_one_bus(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = ServiceDefinition(name="directory", title="a", resource_types=frozenset({"Patient"}))
    second = ServiceDefinition(name="referral", title="b", resource_types=frozenset({"ServiceRequest"}))
    one, two = create_service_app(first, settings), create_service_app(second, settings)
    other = create_service_app(first, _settings(tmp_path))
    assert one.state.bus is two.state.bus and isinstance(one.state.bus, InProcessBus)
    assert other.state.bus is not one.state.bus
    assert one.state.events.service == "directory"


async def _handled(app: FastAPI, expected: int) -> bool:
    return len(await effects(app.state.database, "app-trail")) == expected


async def test_what_start_up_built_is_kept_out_of_full_collections_while_the_app_serves(tmp_path: Path) -> None:
    """A full collection walked everything start-up built (130-170 ms per worker, every few
    seconds under load): frozen while the app serves, handed back to the collector at shutdown."""
    definition = ServiceDefinition(name="directory", title="test", resource_types=frozenset({"Patient"}))
    settings = _settings(tmp_path)
    migrate(settings.database_url("directory"), definition.all_lineages)
    app = create_service_app(definition, settings)
    before = gc.get_freeze_count()  # another app of this process (the tests' system) may serve
    async with app.router.lifespan_context(app):
        frozen = gc.get_freeze_count()
        assert frozen > 10_000 and frozen > before  # the modules and this app at least
    assert gc.get_freeze_count() == 0
