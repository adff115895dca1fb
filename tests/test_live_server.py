"""The embedded system as a real process, driven by a real FHIR client library (fhirpy)."""

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fhirpy import SyncFHIRClient

from tests import live


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    # The embedded default exactly as `make run` starts it: one process, SQLite, demo alliance.
    data_dir: Path = tmp_path_factory.mktemp("live")
    port = live.free_port()
    env = live.environment(data_dir, None, ALLIANCE_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}/fhir")
    live.run_cli(env, "migrate")
    live.run_cli(env, "demo", "load")
    with live.serve(env, "all", port) as url:
        client = live.create_client(env, "Organization/qingxi-county-hospital")
        yield {"url": url, "token": live.token(url, client), "data_dir": str(data_dir)}


@pytest.fixture
def fhir(server: dict[str, str]) -> SyncFHIRClient:
    return SyncFHIRClient(f"{server['url']}/fhir", authorization=f"Bearer {server['token']}")


def test_metadata_and_discovery_need_no_token(server: dict[str, str]) -> None:
    metadata = httpx.get(f"{server['url']}/fhir/metadata")
    assert metadata.status_code == 200
    assert metadata.json()["fhirVersion"] == "4.0.1"
    smart = httpx.get(f"{server['url']}/fhir/.well-known/smart-configuration").json()
    assert smart["token_endpoint"].endswith("/auth/token")
    assert "private_key_jwt" in smart["token_endpoint_auth_methods_supported"]


def test_requests_without_a_token_are_refused(server: dict[str, str]) -> None:
    response = httpx.get(f"{server['url']}/fhir/Patient")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["issue"][0]["code"] == "login"


def test_demo_alliance_is_loaded(fhir: SyncFHIRClient) -> None:
    county = fhir.resources("Organization").search(_id="qingxi-county-hospital").fetch()
    assert [o["name"] for o in county] == ["青溪县人民医院"]
    townships = fhir.resources("Organization").search(partof="Organization/qingxi-county-hospital").fetch_all()
    assert len(townships) >= 8 + 10  # township centers plus the shared and emergency centers
    assert fhir.resources("Patient").search().count() >= 200


def test_fhirpy_create_read_update_search_delete(fhir: SyncFHIRClient) -> None:
    family = f"测试{uuid.uuid4().hex[:6]}"
    patient = fhir.resource("Patient", name=[{"family": family, "given": ["小明"]}], gender="male", birthDate="1980-05-01")
    patient.save()
    assert patient.id
    assert patient["meta"]["versionId"] == "1"

    found = fhir.resources("Patient").search(family=family).fetch()
    assert [p.id for p in found] == [patient.id]

    patient["birthDate"] = "1980-05-02"
    patient.save()
    assert patient["meta"]["versionId"] == "2"
    assert fhir.reference("Patient", patient.id).to_resource()["birthDate"] == "1980-05-02"

    patient.patch(gender="female")  # fhirpy sends a merge patch as application/json
    assert fhir.reference("Patient", patient.id).to_resource()["gender"] == "female"

    assert fhir.resources("Patient").search(family=family, birthdate__ge="1980-05-02").count() == 1
    assert fhir.resources("Patient").search(family=family, birthdate__lt="1980-05-02").count() == 0

    patient.delete()
    assert fhir.resources("Patient").search(family=family).count() == 0


def test_fhirpy_conditional_create_returns_the_existing_resource(fhir: SyncFHIRClient) -> None:
    value = uuid.uuid4().hex
    search = fhir.resources("Patient").search(identifier=f"urn:test|{value}")
    body = {"identifier": [{"system": "urn:test", "value": value}], "gender": "unknown"}
    first, created = search.get_or_create(fhir.resource("Patient", **body))
    again, created_again = search.get_or_create(fhir.resource("Patient", **body))
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert search.count() == 1


def test_fhirpy_conditional_update(fhir: SyncFHIRClient) -> None:
    value = uuid.uuid4().hex
    search = fhir.resources("Patient").search(identifier=f"urn:test|{value}")
    body = {"identifier": [{"system": "urn:test", "value": value}], "gender": "male"}
    created, was_created = search.update(fhir.resource("Patient", **body))
    updated, was_created_again = search.update(fhir.resource("Patient", **{**body, "gender": "female"}))
    assert (was_created, was_created_again) == (True, False)
    assert updated.id == created.id
    assert updated["meta"]["versionId"] == "2"


def test_fhirpy_paging_follows_next_links(fhir: SyncFHIRClient) -> None:
    patients = fhir.resources("Patient").limit(50).fetch_all()
    ids = [p.id for p in patients]
    assert len(ids) >= 200
    assert len(set(ids)) == len(ids)


def test_demo_clients_file_lists_a_client_for_every_organization_kind(server: dict[str, str]) -> None:
    import json

    clients = json.loads((Path(server["data_dir"]) / "demo-clients.json").read_text())
    assert {c["level"] for c in clients} == {"village", "township", "county", "city", "provincial", "center"}
    for entry in clients:
        assert set(entry) >= {"client_id", "client_secret", "organization", "name", "level", "scope"}
        assert entry["organization"].startswith("Organization/")
    township = next(c for c in clients if c["level"] == "township")
    response = httpx.post(
        f"{server['url']}/auth/token",
        data={"grant_type": "client_credentials", "scope": township["scope"]},
        auth=(township["client_id"], township["client_secret"]),
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"


def test_smart_fhirclient_reads_searches_and_creates(server: dict[str, str]) -> None:
    """The SMART on FHIR Python client (client-py) with its R4 models, unchanged."""
    from fhirclient import client
    from fhirclient.models.humanname import HumanName
    from fhirclient.models.organization import Organization
    from fhirclient.models.patient import Patient

    smart = client.FHIRClient(settings={"app_id": "alliance-test", "api_base": f"{server['url']}/fhir"})
    smart.server.session.headers["Authorization"] = f"Bearer {server['token']}"
    county = Organization.read("qingxi-county-hospital", smart.server)
    assert county.name == "青溪县人民医院"
    search = Organization.where(struct={"partof": "Organization/qingxi-county-hospital"})
    clinics = list(search.perform_resources_iter(smart.server))
    assert len(clinics) >= 18

    patient = Patient({"gender": "male", "birthDate": "1977-07-07"})
    patient.name = [HumanName({"family": "赵", "given": ["磊"]})]
    created = patient.create(smart.server)
    assert created["resourceType"] == "Patient"
    read_back = Patient.read(created["id"], smart.server)
    assert read_back.name[0].family == "赵" and read_back.birthDate.isostring == "1977-07-07"


FHIR_KIT_CLIENT = Path(__file__).parent / "clients" / "fhir-kit-client"


def test_fhir_kit_client_drives_the_server_unchanged(server: dict[str, str]) -> None:
    """fhir-kit-client (npm), the R4 client of Node HIS integrations, pinned in its package-lock.json."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH: tests/clients/fhir-kit-client needs them")
    # npm's download cache stays inside the folder (git-ignored), like node_modules.
    npm_env = {**os.environ, "npm_config_cache": str(FHIR_KIT_CLIENT / ".npm-cache")}
    install = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=FHIR_KIT_CLIENT,
        env=npm_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    env = {**os.environ, "FHIR_BASE_URL": f"{server['url']}/fhir", "FHIR_TOKEN": server["token"]}
    run = subprocess.run(
        [node, "check.mjs"], cwd=FHIR_KIT_CLIENT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.stdout.strip(), f"check.mjs printed nothing (exit {run.returncode}):\n{run.stderr}"
    result = json.loads(run.stdout)
    steps = result["steps"]
    failed = {name: step for name, step in steps.items() if not step["ok"]}
    assert not failed, json.dumps(failed, ensure_ascii=False, indent=2)
    assert result["ok"] and run.returncode == 0, run.stderr

    assert steps["capabilityStatement"]["fhirVersion"] == "4.0.1"
    paging = steps["searchAndNextPage"]
    assert len(paging["firstPage"]) == len(paging["secondPage"]) == 2
    assert not set(paging["firstPage"]) & set(paging["secondPage"])
    assert paging["previousPage"] == paging["firstPage"]  # prevPage follows the `previous` link back
    patient_id = steps["create"]["id"]
    assert steps["create"]["versionId"] == "1"
    assert steps["read"]["id"] == patient_id
    assert (steps["update"]["versionId"], steps["update"]["birthDate"]) == ("2", "1990-03-05")
    assert (steps["vread"]["versionId"], steps["vread"]["birthDate"]) == ("1", "1990-03-04")
    found = steps["searchByIdentifierAndName"]
    assert found["byIdentifier"] == found["byName"] == found["postSearch"] == [patient_id]
    assert (steps["jsonPatch"]["gender"], steps["jsonPatch"]["versionId"]) == ("other", "3")
    assert steps["history"]["versions"] == ["3", "2", "1"]
    assert (steps["readUnknownId"]["status"], steps["readUnknownId"]["code"]) == (404, "not-found")
    assert [status[:3] for status in steps["batch"]["statuses"]] == ["201", "200", "404"]
    assert steps["batch"]["notFoundCode"] == "not-found"
    assert (steps["deleteThenGone"]["status"], steps["deleteThenGone"]["code"]) == (410, "deleted")
