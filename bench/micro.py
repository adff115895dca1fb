"""In-process micro-benchmark: the engine's read and create paths against floors measured in the
same run (a bare ASGI app returning the same stored bytes; fhir.resources validation alone).

A quick check without wrk or PostgreSQL: `python -m bench.micro [--seconds 3] [--concurrency 8]`.
Prints a table and writes JSON to bench/results/. The ratios are what matter: absolute numbers drift between runs on shared machines.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": "http://county-alliance.org/fhir/sid/mrn/bench", "value": "B-0001"}],
    "name": [{"use": "official", "family": "王", "given": ["建国"], "text": "王建国"}],
    "telecom": [{"system": "phone", "value": "13800000000"}],
    "gender": "male",
    "birthDate": "1960-01-01",
    "address": [{"text": "浙江省衢州市青溪县城关镇人民路1号", "city": "衢州市", "district": "青溪县"}],
}


async def measure(label: str, call: Callable[[], Awaitable[Any]], seconds: float, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 3)

    return {"name": label, "requests": len(latencies), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 3)}


async def run(seconds: float, concurrency: int) -> list[dict[str, Any]]:
    from fhir.resources.R4B import get_fhir_model_class

    from gateway.app import create_gateway_app, service_definitions
    from servicekit.migrations import upgrade
    from tests.support import Api, system_settings

    with tempfile.TemporaryDirectory() as data:
        settings = system_settings(Path(data), rate_limit_per_second=0)  # measure the server, not the limiter
        for name, definition in service_definitions().items():
            upgrade(settings.database_url(name), definition.all_lineages)
        app = create_gateway_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
                api = Api(app, client)
                created = await api.post("Patient", PATIENT)
                stored = created.content
                path = f"Patient/{created.json()['id']}"
                headers = await api.headers()
                bare = Starlette(routes=[Route("/fhir/Patient/x", lambda r: Response(stored, media_type="application/fhir+json"))])
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://bare") as floor:
                    read_floor = await measure("read floor: bare ASGI app, same bytes",
                                               lambda: floor.get("/fhir/Patient/x"), seconds, concurrency)
                read = await measure("read by id through the gateway",
                                     lambda: client.get(f"/fhir/{path}", headers=headers), seconds, concurrency)
                model = get_fhir_model_class("Patient")

                async def validate_only() -> None:
                    model.model_validate(json.loads(json.dumps(PATIENT)))

                write_floor = await measure("create floor: fhir.resources validation only", validate_only, seconds, 1)
                create = await measure("create through the gateway (validate, store, index)",
                                       lambda: client.post("/fhir/Patient", json=PATIENT, headers=headers),
                                       seconds, concurrency)
    read["ratio_to_floor"] = round(read["rps"] / read_floor["rps"], 3)
    create["ratio_to_floor"] = round(create["rps"] / write_floor["rps"], 3)
    return [read_floor, read, write_floor, create]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    results = asyncio.run(run(args.seconds, args.concurrency))
    print(f"{'figure':58} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'ratio':>6}")
    for row in results:
        print(f"{row['name']:58} {row['rps']:>9} {row['p50_ms']:>8} {row['p95_ms']:>8} {row['p99_ms']:>8} "
              f"{row.get('ratio_to_floor', ''):>6}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    report = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
              "database": "sqlite", "concurrency": args.concurrency, "seconds": args.seconds, "results": results}
    target = out / f"micro-{time.strftime('%Y%m%dT%H%M%S')}.json"
    target.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"written {target}")


if __name__ == "__main__":
    main()
