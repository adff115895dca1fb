"""Server CPU per request of one figure, and optionally a py-spy profile of the server under it.

    python -m bench.profile --figure search|recognition|read|create|transaction [--observations 2000]
                            [--connections 8] [--seconds 10] [--spy out.raw]

Starts `alliance serve` with one worker on fresh PostgreSQL databases (as `python -m bench` does),
loads the demo alliance and lab Observations, VACUUM ANALYZEs, warms the figure up with wrk for 3 s, then
drives it for `--seconds` and prints requests/s, p50/p95 and the server's CPU per request (for
`transaction`: posts `--observations` more lab results in bundles of 100 from 4 loaders, as the
bench's load does, and prints Observations/s and CPU per Observation). With
`--spy`, `py-spy record --pid` samples the server meanwhile (raw, collapsed stacks: sum them by
frame to read). One worker, so that the CPU per request is one process's and the profile whole.
Compare runs made back to back: absolute figures drift on shared machines. Never run as a test.
"""

import argparse
import asyncio
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
from bench.__main__ import POSTGRES, TOWNSHIP, _bearer, _databases, create_load, load_to

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
    parser.add_argument("--figure", choices=FIGURES, required=True)
    parser.add_argument("--observations", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--postgres-url", default=POSTGRES)
    parser.add_argument("--spy", type=Path, help="write py-spy's raw samples of the server here")
    args = parser.parse_args()
    if args.spy is not None and shutil.which("py-spy") is None:
        parser.error("--spy needs py-spy on PATH (uv pip install py-spy)")
    loading = argparse.Namespace(per_patient=20, loaders=4)
    with ExitStack() as stack:
        data_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
        stack.callback(shutil.rmtree, data_dir, True)
        urls = _databases(args.postgres_url, f"profile_{uuid.uuid4().hex[:8]}", list(system.DATABASES), stack)
        env = system.environment(data_dir, urls, **system.pool_size_for(urls, 1))
        system.run_cli(env, "migrate")
        system.run_cli(env, "demo", "load")
        server = system.serve(env, "all", system.free_port(), 1, data_dir)
        stack.callback(system.stop, server)
        tokens = system.Tokens(server.url, data_dir)
        dataset = data.Dataset(uuid.uuid4().hex[:8], data.lab_items())
        load_to(loading, server, tokens, dataset, args.observations)
        system.analyze(urls.values())
        if args.figure == "transaction":
            with _spied(args, server):
                before = server.cpu_seconds()
                stats = asyncio.run(data.add_observations(server.url, tokens, dataset, args.observations,
                                                          dataset.patients, loading.loaders))
                cpu = sum(server.cpu_seconds_since(before).values())
            summary = stats.summary(loading.loaders)
            print(f"transaction: {summary['resources_per_s']} Observations/s, {stats.failed_bundles} failed "
                  f"bundles, server CPU per Observation {cpu / max(1, stats.resources) * 1000:.3f} ms")
            return
        load = figure_load(args.figure, tokens, dataset)
        wrk.run(server.url, load, connections=args.connections, seconds=3)
        with _spied(args, server):
            before = server.cpu_seconds()
            result = wrk.run(server.url, load, connections=args.connections, seconds=args.seconds)
            cpu = sum(server.cpu_seconds_since(before).values())
        print(f"{args.figure}: {result['rps']} req/s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
              f"{result['errors']} errors, server CPU per request {cpu / max(1, result['requests']) * 1000:.3f} ms")


@contextmanager
def _spied(args: argparse.Namespace, server: system.Server) -> Iterator[None]:
    """py-spy samples the server while the block runs, when --spy asks for it."""
    if args.spy is None:
        yield
        return
    spy = subprocess.Popen(["py-spy", "record", "-r", "400", "-f", "raw", "-o", str(args.spy), "--pid",
                            str(server.process.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attached before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples on interrupt
        spy.wait()

if __name__ == "__main__":
    main()
