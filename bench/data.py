"""The bench's data, loaded through the HTTP API like a real client: patients into the directory
(transactions of 100, as the county hospital), then lab Observations as the county lab center
(the demo's producer, so `$recognition-check` finds and judges them) in transaction bundles of
100 from several concurrent connections. The Observation load doubles as the transaction-bundle
scenario: its resources/s and per-bundle latency are reported.
"""

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from bench.system import Tokens

COUNTY = "demo-qingxi-county-hospital"
LAB = "demo-qingxi-lab-center"
LAB_ORG = "Organization/qingxi-lab-center"
COUNTY_ORG = "Organization/qingxi-county-hospital"
BUNDLE = 100
SAMPLE = 2000  # (patient, code) pairs and observation ids kept for the scenarios
MRN = "http://county-alliance.org/fhir/sid/bench-mrn"
REPORT_NUMBER = "http://county-alliance.org/fhir/sid/report-number"
LOINC = "http://loinc.org"
CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}


def lab_items() -> list[tuple[str, str]]:
    """(LOINC, display) of the demo catalog's lab items: the codes the bench's results carry."""
    from results_sharing.load import DEMO_CATALOG, catalog_code_system

    items = []
    for concept in catalog_code_system(DEMO_CATALOG)["concept"]:
        props = {p["code"]: next(v for k, v in p.items() if k.startswith("value")) for p in concept["property"]}
        if props.get("category") == "lab" and props.get("loinc"):
            items.append((str(props["loinc"]), concept["display"]))
    return items


def observation(run: str, uid: str, patient: str, item: tuple[str, str], taken: datetime,
                value: float) -> dict[str, Any]:
    """A county lab result as the LIS sends it (docs/results-sharing.md)."""
    unit = {"value": value, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    return {
        "resourceType": "Observation", "status": "final",
        "identifier": [{"system": REPORT_NUMBER, "value": f"BENCH-{run}-{uid}"}],
        "category": [CATEGORY],
        "code": {"coding": [{"system": LOINC, "code": item[0], "display": item[1]}], "text": item[1]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": taken.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
        "performer": [{"reference": LAB_ORG}],
        "valueQuantity": unit,
        "referenceRange": [{"low": {**unit, "value": 3.5}, "high": {**unit, "value": 5.3}}],
    }


def observation_template(run: str, taken: datetime) -> str:
    """The create scenario's body, with wrk placeholders for patient, code and identifier."""
    body = observation(run, "{{UID}}", "{{PATIENT}}", ("{{CODE}}", "bench"), taken, 4.2)
    return orjson.dumps(body).decode()


def patient(run: str, n: int) -> dict[str, Any]:
    family, given = "王李张刘陈杨黄赵吴周"[n % 10], "伟芳娜敏静丽强磊军洋"[(n // 10) % 10]
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": f"{run}-{n}"}],
        "name": [{"use": "official", "family": family, "given": [given], "text": family + given}],
        "gender": "male" if n % 2 else "female",
        "birthDate": f"{1940 + n % 70}-{1 + n % 12:02d}-{1 + n % 28:02d}",
        "managingOrganization": {"reference": COUNTY_ORG},
    }


def transaction(resources: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r,
         "request": {"method": "POST", "url": r["resourceType"]}} for r in resources]})


@dataclass
class LoadStats:
    resources: int = 0
    bundles: int = 0
    failed_bundles: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None

    def summary(self, connections: int) -> dict[str, Any]:
        ordered = sorted(self.latencies) or [0.0]

        def pct(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000, 1)

        return {"connections": connections, "bundles": self.bundles, "resources": self.resources,
                "seconds": round(self.seconds, 1),
                "resources_per_s": round(self.resources / self.seconds, 1) if self.seconds else 0.0,
                "bundle_p50_ms": pct(0.5), "bundle_p95_ms": pct(0.95), "bundle_p99_ms": pct(0.99),
                "errors": self.failed_bundles,
                "error_rate": round(self.failed_bundles / self.bundles, 4) if self.bundles else 0.0,
                "first_error": self.first_error}


@dataclass
class Dataset:
    """What is loaded so far, and the samples the scenarios draw from."""

    run: str
    items: list[tuple[str, str]]
    seed: int = 7
    patients: list[str] = field(default_factory=list)
    observations: int = 0
    pairs: list[tuple[str, str]] = field(default_factory=list)
    observation_ids: list[str] = field(default_factory=list)
    seen: int = 0  # observations offered to the reservoir samples

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def keep(self, pair: tuple[str, str], observation_id: str) -> None:
        """Reservoir sampling: every loaded observation is equally likely to be in the samples."""
        self.seen += 1
        if len(self.pairs) < SAMPLE:
            self.pairs.append(pair)
            self.observation_ids.append(observation_id)
            return
        slot = self.rng.randrange(self.seen)
        if slot < SAMPLE:
            self.pairs[slot] = pair
            self.observation_ids[slot] = observation_id


async def post_bundles(base: str, tokens: Tokens, client_id: str, bundles: int, connections: int,
                       make: Any, on_done: Any, label: str) -> LoadStats:
    """POST `bundles` transactions, `make(n)` builds bundle n, `on_done(n, response entries)`."""
    stats = LoadStats()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(bundles):
        queue.put_nowait(n)
    progress = _Progress(label, bundles)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            resources = make(n)
            headers = {"Authorization": f"Bearer {tokens.get(client_id)}",
                       "Content-Type": "application/fhir+json", "Prefer": "return=minimal"}
            begin = time.perf_counter()
            response = await http.post(f"{base}/fhir", content=transaction(resources), headers=headers)
            stats.latencies.append(time.perf_counter() - begin)
            stats.bundles += 1
            if response.status_code != 200:
                stats.failed_bundles += 1
                stats.first_error = stats.first_error or f"{response.status_code}: {response.text[:300]}"
                if stats.failed_bundles >= 5 and stats.failed_bundles == stats.bundles:
                    raise RuntimeError(f"{label}: every bundle fails; first error {stats.first_error}")
                continue
            stats.resources += len(resources)
            on_done(n, resources, response.json().get("entry", []))
            progress.step()

    started = time.perf_counter()
    # A new connection per bundle: a kept-alive connection stays with the worker that accepted
    # it, and four loaders' connections landed 4:0 or 3:1 on two workers (one worker did 80 % of
    # the work). A connection costs ~1 ms against a bundle's few hundred.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(connections)))
    stats.seconds = time.perf_counter() - started
    return stats


class _Progress:
    """A line every 30 s during long loads."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= 30 and self.done < self.total:
            self.last = now
            rate = self.done * BUNDLE / (now - self.started)
            eta = (self.total - self.done) * BUNDLE / rate if rate else 0
            print(f"  {self.label}: {self.done}/{self.total} bundles, {rate:.0f} resources/s, "
                  f"about {eta / 60:.0f} min left", flush=True)


def _created_id(entry: dict[str, Any]) -> str:
    return str(entry["response"]["location"].split("/")[1])


async def add_patients(base: str, tokens: Tokens, dataset: Dataset, count: int, connections: int) -> LoadStats:
    first = len(dataset.patients)
    created: list[str] = [""] * count

    def make(n: int) -> list[dict[str, Any]]:
        return [patient(dataset.run, first + i) for i in range(n * BUNDLE, min(count, (n + 1) * BUNDLE))]

    def done(n: int, resources: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
        for i, entry in enumerate(entries):
            created[n * BUNDLE + i] = _created_id(entry)

    bundles = -(-count // BUNDLE)
    stats = await post_bundles(base, tokens, COUNTY, bundles, connections, make, done, "patients")
    dataset.patients += [p for p in created if p]
    return stats


async def add_observations(base: str, tokens: Tokens, dataset: Dataset, count: int, patients: list[str],
                           connections: int) -> LoadStats:
    """`count` lab results over `patients`, taken in the last 30 days (some still valid for
    recognition, some expired: the check judges both)."""
    now = datetime.now(UTC) + timedelta(hours=8)
    first = dataset.observations

    def make(n: int) -> list[dict[str, Any]]:
        rng = random.Random(f"{dataset.seed}-{first}-{n}")
        return [observation(dataset.run, str(first + i), rng.choice(patients), rng.choice(dataset.items),
                            now - timedelta(minutes=rng.randrange(30 * 24 * 60)), round(rng.uniform(3.0, 6.0), 2))
                for i in range(n * BUNDLE, min(count, (n + 1) * BUNDLE))]

    def done(n: int, resources: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
        for resource, entry in zip(resources, entries):
            pair = (resource["subject"]["reference"].split("/")[1], resource["code"]["coding"][0]["code"])
            dataset.keep(pair, _created_id(entry))

    bundles = -(-count // BUNDLE)
    stats = await post_bundles(base, tokens, LAB, bundles, connections, make, done, "observations")
    dataset.observations += stats.resources
    return stats
