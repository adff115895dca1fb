"""`$recognition-check` latency against the number of stored observations (issue 7, item 8).

    python -m bench.recognition [--sizes 100000,1000000] [--patients 50000] [--checks 1000]
                                [--database-url postgresql+psycopg://…/db]

For each size it starts from an empty results-sharing database (SQLite in a temporary directory
unless `--database-url` names an empty database), loads the demo catalog, one quality evaluation
and `size` lab Observations spread over `patients` patients (catalog LOINC codes, the last 60
days) through the engine's write path in-process (validation, indexes, the service's hooks: HR
mark and recognition index), batched 1,000 writes per transaction. Then it times the
`$recognition-check` handler for random (patient, item) pairs, in-process: the directory is an
in-memory stand-in (in production the peer client's cache answers those reads). It prints p50/p95
per size and the ratio of the largest size's p50 to the smallest's, which should stay near 1: the
check reads one index range per (patient, item), however large the store. Never run as a test.
"""

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

BATCH = 1000
PRODUCER = "bench-lab-center"


class Directory:
    """Organizations and patients the check reads, in memory."""

    def __init__(self) -> None:
        level = "http://county-alliance.org/fhir/CodeSystem/facility-level"
        address = [{"city": "衢州市", "state": "浙江省"}]
        self.organizations = {
            "bench-county": {"id": "bench-county", "type": [{"coding": [{"system": level, "code": "county-hospital"}]}],
                             "address": address},
            PRODUCER: {"id": PRODUCER, "type": [{"coding": [{"system": level, "code": "lab-center"}]}],
                       "partOf": {"reference": "Organization/bench-county"}},
            "bench-township": {"id": "bench-township", "partOf": {"reference": "Organization/bench-county"},
                               "type": [{"coding": [{"system": level, "code": "township-health-center"}]}]},
        }

    def holds(self, resource_type: str) -> bool:
        return resource_type in ("Patient", "Organization")

    async def exists(self, resource_type: str, resource_id: str) -> bool:
        return True

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        return self.organizations.get(resource_id) if resource_type == "Organization" else {"id": resource_id}

    async def search(self, resource_type: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return []


class Caller:
    organization = "Organization/bench-township"
    level = "township"
    roles = ("system",)


async def run_size(size: int, patients: int, checks: int, database_url: str | None, seed: int) -> dict[str, Any]:
    from fhirkit.api.router import OperationCall
    from fhirkit.store.repository import Repository, StoreConfig
    from results_sharing import load, recognition
    from results_sharing.fhir import DEFINITION
    from servicekit.migrations import upgrade

    with tempfile.TemporaryDirectory() as data:
        url = database_url or f"sqlite+aiosqlite:///{Path(data) / 'results-sharing.db'}"
        upgrade(url, DEFINITION.all_lineages)
        engine = create_async_engine(url)
        store = StoreConfig(resource_types=DEFINITION.resource_types, hooks=DEFINITION.hooks,
                            references=Directory(), check_references=False)
        catalog = load.catalog_code_system(load.DEMO_CATALOG)
        lab_items = [c for c in catalog["concept"]
                     if any(p["code"] == "category" and p["valueCode"] == "lab" for p in c["property"])]
        loincs = [next(p["valueCode"] for p in c["property"] if p["code"] == "loinc") for c in lab_items]
        async with engine.begin() as conn:
            repo = Repository(conn, store)
            await repo.update("CodeSystem", catalog["id"], catalog)
            record = load.demo_quality_records(date.today())[1]  # the lab category, provincial scope
            record = {**record, "id": "bench-quality", "target": [{"reference": f"Organization/{PRODUCER}"}]}
            await repo.update("VerificationResult", record["id"], record)
        rng = random.Random(seed)
        started = time.perf_counter()
        for first in range(0, size, BATCH):
            async with engine.begin() as conn:
                repo = Repository(conn, store)
                for n in range(first, min(size, first + BATCH)):
                    await repo.create(_observation(n, rng.randrange(patients), rng.choice(loincs), rng))
        load_seconds = time.perf_counter() - started
        latencies: list[float] = []
        for _ in range(checks):
            body = {"resourceType": "Parameters", "parameter": [
                {"name": "patient", "valueReference": {"reference": f"Patient/p{rng.randrange(patients)}"}},
                {"name": "code", "valueCoding": {"system": "http://loinc.org", "code": rng.choice(loincs)}}]}
            async with engine.connect() as conn:
                repo = Repository(conn, store, caller=Caller())
                call = OperationCall(repo, None, None, Caller(), None, None, body, [])  # type: ignore[arg-type]
                begin = time.perf_counter()
                result = await recognition.recognition_check(call)
                latencies.append(time.perf_counter() - begin)
                assert result.status == 200
        await engine.dispose()
    latencies.sort()
    return {"observations": size, "patients": patients, "load_seconds": round(load_seconds, 1),
            "checks": checks, "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 3)}


def _observation(n: int, patient: int, loinc: str, rng: random.Random) -> dict[str, Any]:
    day = rng.randrange(60)
    return {
        "resourceType": "Observation", "status": "final",
        "identifier": [{"system": "http://county-alliance.org/fhir/sid/bench-result", "value": f"B{n}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": f"Patient/p{patient}"},
        "performer": [{"reference": f"Organization/{PRODUCER}"}],
        "effectiveDateTime": time.strftime("%Y-%m-%dT08:00:00Z", time.gmtime(time.time() - day * 86400)),
        "valueQuantity": {"value": round(rng.uniform(1, 10), 2), "unit": "mmol/L",
                          "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="stored observations, comma-separated")
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument("--checks", type=int, default=1000)
    parser.add_argument("--database-url", default=None, help="an EMPTY database to use instead of SQLite")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        row = asyncio.run(run_size(size, args.patients, args.checks, args.database_url, args.seed))
        rows.append(row)
        print(f"{row['observations']:>10} observations, {row['patients']} patients: loaded in {row['load_seconds']} s; "
              f"$recognition-check p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms ({row['checks']} checks)",
              flush=True)
    if len(rows) > 1:
        print(f"p50 ratio {rows[-1]['observations']:,} / {rows[0]['observations']:,}: "
              f"{rows[-1]['p50_ms'] / rows[0]['p50_ms']:.2f}; p95 ratio {rows[-1]['p95_ms'] / rows[0]['p95_ms']:.2f}")


if __name__ == "__main__":
    main()
