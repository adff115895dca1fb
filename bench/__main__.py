"""Load-generator benchmark suite (issue 10): the real system as separate processes, wrk on loopback.

    python -m bench [--database postgresql|sqlite] [--observations 5000[,100000,…]] [--seconds 5]
                    [--workers N] [--skip-distributed]

Starts `alliance serve` (embedded: one process with every service, N uvicorn workers) on fresh
databases, loads the demo alliance, patients and lab Observations through the HTTP API (bundles
of 100, several connections: the transaction figure), and drives each scenario with wrk. Floors
(bench/floor.py) are served as the system is, with the same workers and the same wrk settings in
the same run, in rounds (the median round counts). Then, on PostgreSQL, the distributed mode:
each service its own process behind the gateway, for the gateway hop. Prints a table and the
targets, writes bench/results/bench-*.json. See bench/README.md. Never run as a test.
"""

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from bench import data, report, system, wrk
from bench.floor import prepare_storage

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
READ_SAMPLE = 200  # observations the read scenario (and its floors) draw from
TOWNSHIP = "demo-thc-xikou"  # asks $recognition-check for its patients


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL", POSTGRES),
                        help="server where fresh databases are created (and dropped afterwards)")
    parser.add_argument("--observations", default="5000",
                        help="stored Observations, comma-separated sizes loaded incrementally")
    parser.add_argument("--per-patient", type=int, default=20, help="Observations per patient (patients grow with the store)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="uvicorn workers, system and floors")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measured wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured wrk run before each figure (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--read-connections", type=int, default=32)
    parser.add_argument("--connections", type=int, default=16, help="create, search and $recognition-check")
    parser.add_argument("--loaders", type=int, default=4, help="concurrent loader connections")
    parser.add_argument("--paired-rounds", type=int, default=3,
                        help="search rounds alternating a second system loaded to the smallest size with the "
                             "largest, for the growth target (0: none)")
    parser.add_argument("--hop-rounds", type=int, default=3,
                        help="distributed mode: rounds of read via the gateway then at the service, at one "
                             "connection; the hop is the median of their differences at p50")
    parser.add_argument("--floor-rounds", type=int, default=3,
                        help="rounds over the four floors, each floor's figure the round with the median "
                             "requests/s")
    parser.add_argument("--skip-distributed", action="store_true")
    args = parser.parse_args()
    args.sizes = sorted(int(s.replace("_", "")) for s in args.observations.split(","))
    return args


def main() -> None:
    args = parse_args()
    wrk.ensure_wrk()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    logs = report.RESULTS / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    postgres = args.postgres_url if args.database == "postgresql" else None
    result = _report_header(args, postgres)
    try:
        with ExitStack() as stack:
            embedded(args, postgres, logs, stack, result)
        if postgres and not args.skip_distributed:
            with ExitStack() as stack:
                result["distributed"] = distributed(args, postgres, logs, stack)
    finally:
        result["targets"] = report.evaluate(result)
        report.print_table(result)
        report.print_targets(result["targets"])
        print(f"\nwritten {report.write(result)} (server logs in {logs})")


def _report_header(args: argparse.Namespace, postgres: str | None) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": system.cpu_model(), "arch": platform.machine(),
                    "python": platform.python_version()},
        "database": args.database, "database_version": system.database_version(postgres),
        "autovacuum": system.autovacuum(postgres),
        "workers": args.workers, "seconds": args.seconds, "warmup": args.warmup, "wrk_threads": args.threads,
        "sizes": args.sizes, "per_patient": args.per_patient, "loaders": args.loaders,
        "rows": [], "loads": [], "memory": {},
    }


# --- the embedded system ------------------------------------------------------------------------

def embedded(args: argparse.Namespace, postgres: str | None, logs: Path, stack: ExitStack,
             result: dict[str, Any]) -> None:
    run = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    stack.callback(shutil.rmtree, data_dir, True)
    urls = _databases(postgres, f"bench_{run}", [*system.DATABASES, "floor"], stack)
    floor_url = urls.pop("floor", None) or f"sqlite+aiosqlite:///{data_dir / 'floor.db'}"
    env = system.environment(data_dir, urls, **system.pool_size_for(urls, args.workers))
    _timed("migrate", lambda: system.run_cli(env, "migrate"))
    _timed("demo load", lambda: system.run_cli(env, "demo", "load"))
    server = system.serve(env, "all", system.free_port(), args.workers, logs)
    stack.callback(system.stop, server)
    tokens = system.Tokens(server.url, data_dir)
    dataset = data.Dataset(run, data.lab_items())
    for size in args.sizes:
        result["loads"].append(load_to(args, server, tokens, dataset, size))
        result["loads"][-1]["events_pending"] = _events_pending(urls.values())
        _timed("analyze", lambda: system.analyze(urls.values()))
        result["rows"] += [search(args, server, tokens, dataset), check(args, server, tokens, dataset),
                           check(args, server, tokens, dataset, repeated=True)]
    result["memory"]["embedded"] = _memory(server, {"stored_observations": dataset.observations})
    stored = _stored_bytes(server.url, tokens, dataset.observation_ids[:READ_SAMPLE])
    read_row = read(args, server, tokens, stored, dataset.observations)
    create_row = create(args, server, tokens, dataset)
    system.stop(server)  # the floors get the machine to themselves
    if len(args.sizes) > 1 and args.paired_rounds > 0:
        result["rows"] += paired_search(args, postgres, logs, stack, (env, data_dir, dataset))
    floors = measure_floors(args, env, logs, stored, floor_url, dataset, run)
    result["rows"] = [*floors.values(), *_with_floors(result["rows"], read_row, create_row, floors)]


Stored = tuple[dict[str, str], Path, data.Dataset]  # a system's environment, data directory and dataset


def paired_search(args: argparse.Namespace, postgres: str | None, logs: Path, stack: ExitStack,
                  largest: Stored) -> list[dict[str, Any]]:
    """The search against a second store loaded to the smallest size and against the largest,
    alternated round by round: the growth target then compares figures taken minutes apart. The
    incremental load's two figures are most of an hour apart on a 1,000,000 run, and this
    machine's speed moved by half within minutes (one create figure of one code: 3.5 to 7.0 ms
    of CPU). One system serves at a time, started afresh for each figure (its caches warm in the
    warm-up), so both run alike and PostgreSQL's connections suffice."""
    run = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-paired-"))
    stack.callback(shutil.rmtree, data_dir, True)
    urls = _databases(postgres, f"bench_{run}", list(system.DATABASES), stack)
    env = system.environment(data_dir, urls, **system.pool_size_for(urls, args.workers))
    system.run_cli(env, "migrate")
    system.run_cli(env, "demo", "load")
    smallest: Stored = (env, data_dir, data.Dataset(run, data.lab_items()))
    print(f"paired search: a second store loaded to {args.sizes[0]:,}", flush=True)
    with _serving(args, logs, smallest) as (server, tokens):
        load_to(args, server, tokens, smallest[2], args.sizes[0])
    _timed("analyze", lambda: system.analyze(urls.values()))
    rows = []
    for _ in range(args.paired_rounds):
        for stored in (smallest, largest):
            with _serving(args, logs, stored) as (server, tokens):
                rows.append({**search(args, server, tokens, stored[2]), "key": "search-paired"})
    return rows


@contextmanager
def _serving(args: argparse.Namespace, logs: Path, stored: Stored) -> Iterator[tuple[system.Server, system.Tokens]]:
    env, data_dir, _ = stored
    server = system.serve(env, "all", system.free_port(), args.workers, logs)
    try:
        yield server, system.Tokens(server.url, data_dir)
    finally:
        system.stop(server)


def _databases(postgres: str | None, prefix: str, names: list[str], stack: ExitStack) -> dict[str, str]:
    if postgres is None:
        return {}
    db_names = {name: f"{prefix}_{name.replace('-', '_')}" for name in names}
    urls = stack.enter_context(system.postgres_databases(postgres, list(db_names.values())))
    return {name: urls[db] for name, db in db_names.items()}


def _events_pending(urls: Any) -> int | None:
    pending = system.events_pending(urls)
    if pending is not None:
        print(f"  events not yet delivered as the load ended: {pending:,}", flush=True)
    return pending


def _timed(label: str, action: Any) -> Any:
    began = time.perf_counter()
    value = action()
    print(f"{label}: {time.perf_counter() - began:.1f} s", flush=True)
    return value


def load_to(args: argparse.Namespace, server: system.Server, tokens: system.Tokens, dataset: data.Dataset,
            size: int) -> dict[str, Any]:
    """Patients for the new Observations first, then the Observations, spread over the new
    patients only: every patient ends up with about --per-patient results at every size."""
    count = size - dataset.observations
    new_patients = max(1, count // args.per_patient)
    base = server.url
    print(f"loading {new_patients:,} patients and {count:,} observations (to {size:,})", flush=True)
    patients = asyncio.run(data.add_patients(base, tokens, dataset, new_patients, args.loaders))
    fresh = dataset.patients[-new_patients:]
    cpu_before = server.cpu_seconds()
    observations = asyncio.run(data.add_observations(base, tokens, dataset, count, fresh, args.loaders))
    cpu = server.cpu_seconds_since(cpu_before)
    load = {"stored": size, "bundle": data.BUNDLE, "patients": patients.summary(args.loaders),
            "observations": observations.summary(args.loaders), "cpu_seconds_per_process": cpu}
    print(f"  {load['observations']['resources_per_s']} observations/s, {load['patients']['resources_per_s']} "
          f"patients/s, {observations.failed_bundles + patients.failed_bundles} failed bundles; "
          f"CPU seconds per server process during the Observations: {sorted(cpu.values(), reverse=True)}",
          flush=True)
    return load


def measure(args: argparse.Namespace, key: str, name: str, base: str, load: wrk.Load, connections: int,
            stored: int | None, server: system.Server | None = None) -> dict[str, Any]:
    """One wrk figure; with `server`, also the CPU seconds each of its processes spent on it (wrk's
    connections stay with the worker that accepted them: one core or two may serve a figure)."""
    if server is not None:
        _wait_until_idle(server)
    if args.warmup > 0:
        wrk.run(base, load, connections=connections, seconds=args.warmup, threads=args.threads)
    cpu_before = server.cpu_seconds() if server is not None else {}
    row = wrk.run(base, load, connections=connections, seconds=args.seconds, threads=args.threads)
    row.update(key=key, name=name, stored=stored)
    print(report.row_line(row), flush=True)
    if server is not None:
        cpu = server.cpu_seconds_since(cpu_before)
        row["cpu_seconds_per_process"] = cpu
        print(f"  CPU seconds per server process: {sorted(cpu.values(), reverse=True)}", flush=True)
    return row


def _wait_until_idle(server: system.Server, limit: float = 120.0) -> None:
    """Wait until the server's processes are nearly idle (the previous figure's events handled):
    wrk opens its connections at once, and a worker still busy then accepts none of them, so the
    figure would be served by one worker (seen: 3.8 and 0.3 CPU s over two workers)."""
    began = time.monotonic()
    before = sum(server.cpu_seconds().values())
    while time.monotonic() - began < limit:
        time.sleep(0.5)
        now = sum(server.cpu_seconds().values())
        if now - before < 0.05:  # all its processes together: under a tenth of a core
            break
        before = now
    waited = time.monotonic() - began
    if waited > 1.5:
        print(f"  (waited {waited:.1f} s for the server to finish earlier work)", flush=True)


def _bearer(tokens: system.Tokens, client_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.get(client_id)}", "Content-Type": "application/fhir+json"}


def search(args: argparse.Namespace, server: system.Server, tokens: system.Tokens, dataset: data.Dataset) -> dict[str, Any]:
    """Observation?patient=…&code=… for (patient, code) pairs sampled from what was loaded, so
    every search finds at least one result; as the lab center, which may read its results."""
    paths = [f"/fhir/Observation?patient=Patient/{p}&code={quote(data.LOINC + '|' + c, safe='/:')}"
             for p, c in dataset.pairs]
    load = wrk.Load("GET", paths, _bearer(tokens, data.LAB))
    return measure(args, "search", "search Observation?patient&code", server.url, load, args.connections,
                   dataset.observations, server)


def check(args: argparse.Namespace, server: system.Server, tokens: system.Tokens, dataset: data.Dataset,
          *, repeated: bool = False) -> dict[str, Any]:
    """$recognition-check by a township health center, for the same sampled pairs. Right after a
    load many of them are checked for the first time, which records grants; `repeated`: the same
    pairs again, nearly all held already, so nothing is written (shown beside the judged figure)."""
    paths = [f"/fhir/$recognition-check?patient=Patient/{p}&code={quote(data.LOINC + '|' + c, safe='/:')}"
             for p, c in dataset.pairs]
    load = wrk.Load("GET", paths, _bearer(tokens, TOWNSHIP))
    key, name = ("recognition-repeated", "$recognition-check, pairs again") if repeated else (
        "recognition", "$recognition-check")
    return measure(args, key, name, server.url, load, args.connections, dataset.observations, server)


def _stored_bytes(base: str, tokens: system.Tokens, ids: list[str]) -> dict[str, str]:
    """The exact bytes the gateway serves for each sampled Observation (the read floor's answers)."""
    stored = {}
    with httpx.Client(headers=_bearer(tokens, data.LAB), timeout=30) as http:
        for resource_id in ids:
            response = http.get(f"{base}/fhir/Observation/{resource_id}")
            response.raise_for_status()
            stored[resource_id] = response.content.decode("utf-8")
    return stored


def read(args: argparse.Namespace, server: system.Server, tokens: system.Tokens, stored: dict[str, str],
         size: int) -> dict[str, Any]:
    load = wrk.Load("GET", [f"/fhir/Observation/{i}" for i in stored], _bearer(tokens, data.LAB))
    return measure(args, "read", "read Observation by id (gateway)", server.url, load, args.read_connections, size,
                   server)


def create_load(headers: dict[str, str], dataset: data.Dataset) -> wrk.Load:
    from datetime import UTC, datetime, timedelta

    taken = datetime.now(UTC) + timedelta(hours=7)
    return wrk.Load("POST", ["/fhir/Observation"], headers, data.observation_template(dataset.run, taken),
                    patients=dataset.patients[-5000:], codes=[code for code, _ in dataset.items])


def create(args: argparse.Namespace, server: system.Server, tokens: system.Tokens, dataset: data.Dataset) -> dict[str, Any]:
    load = create_load(_bearer(tokens, data.LAB), dataset)
    return measure(args, "create", "create Observation (gateway)", server.url, load, args.connections,
                   dataset.observations, server)


# --- floors -------------------------------------------------------------------------------------

def measure_floors(args: argparse.Namespace, env: dict[str, str], logs: Path, stored: dict[str, str],
                   database_url: str, dataset: data.Dataset, run: str) -> dict[str, dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    try:
        spec = work / "floor.json"
        spec.write_text(_json({"resources": stored, "database_url": database_url}), encoding="utf-8")
        prepare_storage(database_url, stored)
        paths = [f"/fhir/Observation/{i}" for i in stored]
        reads = wrk.Load("GET", paths, {"Content-Type": "application/fhir+json"})
        writes = create_load({"Content-Type": "application/fhir+json"}, dataset)
        plan = [("floor-read", "read", "floor: bare app, stored bytes", reads, args.read_connections),
                ("floor-create", "create", "floor: fhir.resources validation", writes, args.connections),
                ("floor-storage-read", "storage", "floor: storage select by id", reads, args.read_connections),
                ("floor-storage-insert", "storage", "floor: storage insert", writes, args.connections)]
        with ExitStack() as servers:
            bases = {key: servers.enter_context(_floor_server(args, env, logs, mode, spec)) for key, mode, *_ in plan}
            rounds: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in plan}
            # Round by round over the four, so that a slow minute of the machine lowers one
            # round of each floor, not every round of one floor.
            for _ in range(max(args.floor_rounds, 1)):
                for key, _mode, name, load, connections in plan:
                    rounds[key].append(measure(args, key, name, bases[key], load, connections, None))
        return {key: report.median_round(rows) for key, rows in rounds.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _floor_server(args: argparse.Namespace, env: dict[str, str], logs: Path, mode: str, spec: Path) -> Iterator[str]:
    """The floor app with as many workers as the system had, served the same way (bench.floor.main)."""
    port = system.free_port()
    command = [sys.executable, "-m", "bench.floor", "--port", str(port), "--workers", str(args.workers)]
    server = system.start(f"floor-{mode}", command, {**env, "BENCH_FLOOR_MODE": mode, "BENCH_FLOOR_DATA": str(spec)},
                          port, logs)
    try:
        yield server.url
    finally:
        system.stop(server)


def _with_floors(rows: list[dict[str, Any]], read_row: dict[str, Any], create_row: dict[str, Any],
                 floors: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each figure next to its floor: reads to the bare-bytes floor, creates to validation alone,
    searches and checks to one select by primary key (the least a query of the store costs)."""
    pairs = [(read_row, "floor-read"), (create_row, "floor-create")]
    pairs += [(row, "floor-storage-read") for row in rows]
    extra = [({**read_row, "key": "read-vs-storage"}, "floor-storage-read"),
             ({**create_row, "key": "create-vs-storage"}, "floor-storage-insert")]
    out = []
    for row, floor_key in [*pairs[:2], *extra, *pairs[2:]]:
        floor = floors[floor_key]
        out.append({**row, "floor": floor["name"], "floor_rps": floor["rps"],
                    "ratio": round(row["rps"] / floor["rps"], 3) if floor["rps"] else None})
    return out


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _memory(server: system.Server, context: dict[str, Any]) -> dict[str, Any]:
    rss = server.rss_kb()
    processes = [{"pid": pid, "role": _role(server, pid, len(rss)), "rss_mb": round(kb / 1024, 1)}
                 for pid, kb in rss.items()]
    return {**context, "processes": processes}


def _role(server: system.Server, pid: int, count: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = ""
    if "resource_tracker" in command:
        return "resource tracker"
    if pid == server.process.pid and count > 1:
        return f"{server.name} supervisor"
    return f"{server.name} worker"


# --- distributed mode ---------------------------------------------------------------------------

def distributed(args: argparse.Namespace, postgres: str, logs: Path, stack: ExitStack) -> dict[str, Any]:
    """Each service its own process on its own database, the gateway in front (as
    tests/test_distributed.py starts them): read by id through the gateway and directly at the
    results-sharing service with a signed identity; the difference at p50 is the gateway hop."""
    print("distributed mode: starting the services and the gateway", flush=True)
    run = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    stack.callback(shutil.rmtree, data_dir, True)
    urls = _databases(postgres, f"bench_{run}", list(system.DATABASES), stack)
    ports = {name: system.free_port() for name in (*system.SERVICES, "gateway")}
    env = system.environment(
        data_dir, urls, ALLIANCE_PLATFORM_URL=f"http://127.0.0.1:{ports['gateway']}/internal/platform",
        **{f"ALLIANCE_{s.upper().replace('-', '_')}_URL": f"http://127.0.0.1:{ports[s]}" for s in system.SERVICES})
    system.run_cli(env, "migrate")
    servers = {}
    for name in (*system.SERVICES, "gateway"):
        servers[name] = system.serve(env, name, ports[name], 1, logs)
        stack.callback(system.stop, servers[name])
    _timed("demo load (distributed)", lambda: system.run_cli(env, "demo", "load"))
    tokens = system.Tokens(servers["gateway"].url, data_dir)
    dataset = data.Dataset(run, data.lab_items())
    asyncio.run(data.add_patients(servers["gateway"].url, tokens, dataset, 100, 2))
    asyncio.run(data.add_observations(servers["gateway"].url, tokens, dataset, 1000, dataset.patients, 2))
    rows = _hop_rows(args, servers, tokens, dataset)
    memory = {name: _memory(server, {})["processes"] for name, server in servers.items()}
    hop, rounds = report.gateway_hop(rows, 1)
    loaded, _ = report.gateway_hop(rows, args.read_connections)
    return {"rows": rows, "memory": memory, "hop": {
        "p50_ms": hop, "p50_ms_rounds": rounds, "p50_ms_loaded": loaded,
        "loaded_connections": args.read_connections}}


def _hop_rows(args: argparse.Namespace, servers: dict[str, system.Server], tokens: system.Tokens,
              dataset: data.Dataset) -> list[dict[str, Any]]:
    from servicekit.identity import IDENTITY_HEADER, CallerIdentity, sign_identity

    identity = CallerIdentity(client_id=data.LAB, organization=data.LAB_ORG, scopes=("system/*.cruds",),
                              level="center")
    # Signed like the gateway signs it, with the bench's secret; valid for the whole run.
    signed = sign_identity(identity, system.SECRETS["ALLIANCE_INTERNAL_SECRET"].encode(), ttl_seconds=3600)
    paths = [f"/fhir/Observation/{i}" for i in dataset.observation_ids[:READ_SAMPLE]]
    through = wrk.Load("GET", paths, _bearer(tokens, data.LAB))
    direct = wrk.Load("GET", paths, {IDENTITY_HEADER: signed})
    rows = []
    # At one connection in alternating rounds (a round's two figures are seconds apart; the
    # machine's speed moves by more than the hop between runs), then once under load.
    for connections in [1] * max(args.hop_rounds, 1) + [args.read_connections]:
        rows.append(measure(args, "gateway", "distributed: read via gateway", servers["gateway"].url, through,
                            connections, dataset.observations))
        rows.append(measure(args, "direct", "distributed: read at the service", servers["results-sharing"].url,
                            direct, connections, dataset.observations))
    return rows


if __name__ == "__main__":
    main()
