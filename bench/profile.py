"""Server CPU per request of one figure, and optionally a py-spy profile of the server under it.

    python -m bench.profile --figure search|recognition|read|create|transaction [--observations 2000]
                            [--connections 8] [--seconds 10] [--spy out.raw] [--store DIR [--drop]]

Starts `alliance serve` with one worker on fresh PostgreSQL databases (as `python -m bench` does),
loads the demo alliance and lab Observations, VACUUM ANALYZEs, warms the figure up with wrk (`--warmup`, 3 s), then
drives it for `--seconds` and prints requests/s, p50/p95 and the server's CPU per request (for
`transaction`: posts `--observations` more lab results in bundles of 100 from 4 loaders, as the
bench's load does, and prints Observations/s and CPU per Observation). It also prints PostgreSQL's
CPU per request, by service database, summed over the local backends (`system.postgres_cpu_seconds`).
With `--store DIR` the databases (`keep_<dir>_*`) and the dataset outlive the run, and a later run
with the same DIR serves them again, loading only what `--observations` adds: code compared on the
same 1,000,000 without a 15-minute load each time (`transaction` grows the store). `--drop` removes
them. With
`--spy`, `py-spy record --pid` samples the server meanwhile (raw, collapsed stacks: sum them by
frame to read). One worker by default, so that the CPU per request is one process's and the profile
whole; `--workers 2` serves as the bench does.
Compare runs made back to back: absolute figures drift on shared machines. Never run as a test.
"""

import argparse
import asyncio
import pickle
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import quote

from bench import data, system, wrk
from bench.__main__ import POSTGRES, TOWNSHIP, _bearer, _databases, _events_pending, create_load, load_to

FIGURES = ("search", "recognition", "read", "create", "transaction")


def figure_load(figure: str, tokens: system.Tokens, dataset: data.Dataset) -> wrk.Load:
    pairs = [f"patient=Patient/{p}&code={quote(data.LOINC + '|' + c, safe='/:')}" for p, c in dataset.pairs]
    if figure == "search":
        return wrk.Load("GET", [f"/fhir/Observation?{q}" for q in pairs], _bearer(tokens, data.LAB))
    if figure == "recognition":
        return wrk.Load("GET", [f"/fhir/$recognition-check?{q}" for q in pairs], _bearer(tokens, TOWNSHIP))
    if figure == "read":
        ids = dataset.observation_ids[:500]
        return wrk.Load("GET", [f"/fhir/Observation/{i}" for i in ids], _bearer(tokens, data.LAB))
    return create_load(_bearer(tokens, data.LAB), dataset)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figure", choices=FIGURES)
    parser.add_argument("--observations", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="server workers (py-spy samples them all)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk before the measured run")
    parser.add_argument("--postgres-url", default=POSTGRES)
    parser.add_argument("--spy", type=Path, help="write py-spy's raw samples of the server here")
    parser.add_argument("--store", type=Path, help="keep the loaded databases and dataset here and reuse them on "
                        "later runs (loading 1,000,000 takes 15 minutes); PostgreSQL databases keep_<dir>_*")
    parser.add_argument("--drop", action="store_true", help="with --store: drop its databases and directory")
    args = parser.parse_args()
    if args.figure is None and not (args.store and args.drop):
        parser.error("--figure is required (unless --store DIR --drop)")
    if args.spy is not None and shutil.which("py-spy") is None:
        parser.error("--spy needs py-spy on PATH (uv pip install py-spy)")
    loading = argparse.Namespace(per_patient=20, loaders=4)
    with ExitStack() as stack:
        if args.store is not None and args.drop:
            _drop_store(args)
            return
        data_dir, urls, dataset = _store(args, stack)
        env = system.environment(data_dir, urls, **system.pool_size_for(urls, args.workers))
        server = system.serve(env, "all", system.free_port(), args.workers, data_dir)
        stack.callback(system.stop, server)
        tokens = system.Tokens(server.url, data_dir)
        if dataset.observations < args.observations:
            load_to(loading, server, tokens, dataset, args.observations)
            system.analyze(urls.values())
            _save_store(args, dataset)
        databases = {url.rsplit("/", 1)[1]: name for name, url in urls.items()}
        if args.figure == "transaction":
            with _spied(args, server):
                before, pg_before = server.cpu_seconds(), system.postgres_cpu_seconds(databases)
                stats = asyncio.run(data.add_observations(server.url, tokens, dataset, args.observations,
                                                          dataset.patients, loading.loaders))
                cpu = sum(server.cpu_seconds_since(before).values())
                pg = _since(databases, pg_before, system.postgres_cpu_seconds(databases))
            _save_store(args, dataset)
            summary = stats.summary(loading.loaders)
            print(f"transaction: {summary['resources_per_s']} Observations/s, {stats.failed_bundles} failed "
                  f"bundles, server CPU per Observation {cpu / max(1, stats.resources) * 1000:.3f} ms")
            _print_postgres(pg, stats.resources, "Observation")
            _events_pending(urls.values())
            return
        load = figure_load(args.figure, tokens, dataset)
        wrk.run(server.url, load, connections=args.connections, seconds=args.warmup)
        with _spied(args, server):
            before, pg_before = server.cpu_seconds(), system.postgres_cpu_seconds(databases)
            result = wrk.run(server.url, load, connections=args.connections, seconds=args.seconds)
            cpu = sum(server.cpu_seconds_since(before).values())
            pg = _since(databases, pg_before, system.postgres_cpu_seconds(databases))
        print(f"{args.figure}: {result['rps']} req/s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
              f"{result['errors']} errors, server CPU per request {cpu / max(1, result['requests']) * 1000:.3f} ms")
        _print_postgres(pg, result["requests"], "request")


def _store(args: argparse.Namespace, stack: ExitStack) -> tuple[Path, dict[str, str], data.Dataset]:
    """The data directory, databases and dataset to serve: fresh ones dropped at the end, or with
    `--store` the ones kept there by an earlier run (created and loaded on first use)."""
    if args.store is None:
        data_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
        stack.callback(shutil.rmtree, data_dir, True)
        urls = _databases(args.postgres_url, f"profile_{uuid.uuid4().hex[:8]}", list(system.DATABASES), stack)
        return data_dir, urls, _fresh(data_dir, urls)
    data_dir, names = args.store / "data", _store_names(args)
    urls = {name: f"{args.postgres_url.rstrip('/')}/{db}" for name, db in names.items()}
    if (args.store / "dataset.pickle").exists():
        return data_dir, urls, pickle.loads((args.store / "dataset.pickle").read_bytes())
    data_dir.mkdir(parents=True, exist_ok=True)
    system.create_databases(args.postgres_url, names.values())
    return data_dir, urls, _fresh(data_dir, urls)


def _fresh(data_dir: Path, urls: dict[str, str]) -> data.Dataset:
    env = system.environment(data_dir, urls)
    system.run_cli(env, "migrate")
    system.run_cli(env, "demo", "load")
    return data.Dataset(uuid.uuid4().hex[:8], data.lab_items())


def _store_names(args: argparse.Namespace) -> dict[str, str]:
    tag = "".join(c if c.isalnum() else "_" for c in args.store.resolve().name.lower())
    return {name: f"keep_{tag}_{name.replace('-', '_')}" for name in system.DATABASES}


def _save_store(args: argparse.Namespace, dataset: data.Dataset) -> None:
    if args.store is not None:
        (args.store / "dataset.pickle").write_bytes(pickle.dumps(dataset))


def _drop_store(args: argparse.Namespace) -> None:
    system.drop_databases(args.postgres_url, _store_names(args).values())
    shutil.rmtree(args.store, ignore_errors=True)
    print(f"dropped the store {args.store}")


def _since(databases: dict[str, str], before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each service's database CPU seconds between two readings, by service name."""
    return {databases[db]: after.get(db, 0.0) - seconds for db, seconds in before.items()}


def _print_postgres(seconds: dict[str, float], count: int, unit: str) -> None:
    """PostgreSQL's CPU per request (or Observation), by database: the work the server's CPU misses."""
    parts = [f"{service} {value / max(1, count) * 1000:.3f}" for service, value in sorted(seconds.items()) if value > 0]
    print(f"  PostgreSQL CPU per {unit} {sum(seconds.values()) / max(1, count) * 1000:.3f} ms"
          + (f" ({', '.join(parts)})" if parts else ""))


@contextmanager
def _spied(args: argparse.Namespace, server: system.Server) -> Iterator[None]:
    """py-spy samples the server while the block runs, when --spy asks for it."""
    if args.spy is None:
        yield
        return
    workers = ["--subprocesses"] if args.workers > 1 else []
    spy = subprocess.Popen(["py-spy", "record", "-r", "400", "-f", "raw", "-o", str(args.spy), *workers, "--pid",
                            str(server.process.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attached before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples on interrupt
        spy.wait()

if __name__ == "__main__":
    main()
