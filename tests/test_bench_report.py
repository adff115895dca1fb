"""The bench's judgement of its targets (bench/report.py): arithmetic only, no load."""

import importlib.util
from pathlib import Path

import pytest

# bench/ is a directory of the repository, not an installed package.
_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[1] / "bench" / "report.py")
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
evaluate, paired_growth = report.evaluate, report.paired_growth


def _search(key: str, stored: int, p95: float) -> dict[str, object]:
    return {"key": key, "stored": stored, "p95_ms": p95, "p99_ms": p95}


def test_the_paired_growth_is_the_median_of_each_rounds_ratio() -> None:
    rows = [_search("search-paired", 100_000, 20.0), _search("search-paired", 1_000_000, 24.0),   # 1.2
            _search("search-paired", 100_000, 40.0), _search("search-paired", 1_000_000, 80.0),   # 2.0
            _search("search-paired", 100_000, 30.0), _search("search-paired", 1_000_000, 39.0)]   # 1.3
    assert paired_growth(rows) == 1.3
    assert paired_growth(rows[:4]) == 1.6  # an even count: the mean of the middle two
    # A ratio of medians would pair the slow round's 1,000,000 with another round's 100,000.
    assert paired_growth([*rows, _search("search-paired", 100_000, 10.0)]) == 1.3  # an unfinished round
    assert paired_growth([_search("search", 100_000, 20.0)]) is None


def test_the_target_is_judged_on_the_paired_rounds_and_the_incremental_figures_are_shown() -> None:
    report = {"sizes": [100_000, 1_000_000], "loads": [], "rows": [
        _search("search", 100_000, 20.0), _search("search", 1_000_000, 41.0),  # 2.05 across the load
        _search("search-paired", 100_000, 30.0), _search("search-paired", 1_000_000, 36.0)]}
    growth = [t for t in evaluate(report) if "growth" in t["target"] or "before and after" in t["target"]]
    assert [(t["measured"], t["status"]) for t in growth] == [("1.200x", "pass"), ("2.050x", "n/a")]
    report["rows"] = report["rows"][:2]  # no paired rounds (--paired-rounds 0): judged as before
    assert [(t["measured"], t["status"]) for t in evaluate(report) if "growth" in t["target"]] == [("2.050x", "miss")]


def test_the_check_is_judged_on_its_first_figure_and_the_repeated_pairs_are_shown() -> None:
    report = {"sizes": [1_000_000], "loads": [], "rows": [
        {"key": "recognition", "stored": 1_000_000, "p95_ms": 32.5, "p99_ms": 47.4},
        {"key": "recognition-repeated", "stored": 1_000_000, "p95_ms": 18.0, "p99_ms": 25.0}]}
    checks = [(t["target"], t["measured"], t["status"]) for t in evaluate(report) if "check" in t["target"]]
    assert checks == [("$recognition-check p95 <= 20 ms at 1,000,000 (at 1,000,000)", "32.500 ms", "miss"),
                      ("  the same pairs checked again (shown, not judged)", "18.000 ms", "n/a")]
    report["rows"] = report["rows"][:1]  # a report written before the repeated figure existed
    assert [t["status"] for t in evaluate(report) if "check" in t["target"]] == ["miss"]


def test_read_and_create_are_judged_on_their_floors_and_shown_against_storage() -> None:
    def figure(key: str, ratio: float) -> dict[str, object]:
        return {"key": key, "stored": 1_000_000, "ratio": ratio, "p95_ms": 20.0, "p99_ms": 34.0}

    report = {"sizes": [1_000_000], "loads": [], "rows": [
        figure("read", 0.030), figure("create", 0.041),
        figure("read-vs-storage", 0.583), figure("create-vs-storage", 0.184)]}
    judged = [(t["target"], t["measured"], t["status"]) for t in evaluate(report)
              if "read" in t["target"] or "create" in t["target"]]
    assert judged == [
        ("read by id >= 0.50 x bare-bytes floor", "0.030", "miss"),
        ("  the same reads to the storage-select floor (shown, not judged)", "0.583", "n/a"),
        ("read by id p99 <= 10 ms at 32 connections", "34.000 ms", "miss"),
        ("create >= 0.60 x validate-only floor", "0.041", "miss"),
        ("  the same creates to the storage-insert floor (shown, not judged)", "0.184", "n/a")]
    report["rows"] = report["rows"][:2]  # no storage floors measured: nothing shown for them
    assert [t["status"] for t in evaluate(report) if "read" in t["target"] or "create" in t["target"]] == [
        "miss", "miss", "miss"]


def test_search_check_and_transaction_are_shown_against_the_machines_storage_floors() -> None:
    """The three absolute targets with the machine taken out (bench/README, session 18): a
    latency times the select floor's rate, the transaction's rate over the insert floor's."""
    load = {"observations": {"resources": 716_000, "seconds": 1_000.0}}
    report = {"sizes": [1_000_000], "loads": [load], "rows": [
        {"key": "floor-storage-insert", "stored": None, "rps": 940.0, "p95_ms": 30.0, "p99_ms": 41.0},
        {"key": "search", "stored": 1_000_000, "p95_ms": 98.5, "p99_ms": 124.0, "floor_rps": 1_172.0},
        {"key": "recognition", "stored": 1_000_000, "p95_ms": 60.0, "p99_ms": 89.0, "floor_rps": 1_172.0}]}
    targets = evaluate(report)
    shown = [(targets[i - 1]["target"][:18], t["target"], t["measured"], t["status"])
             for i, t in enumerate(targets) if "proposed" in t["target"]]
    assert shown == [  # each under the target it restates
        ("search p95 <= 50 m", "  search p95 (s) x storage-select floor/s (shown, not judged; 175 proposed)",
         "115.442", "n/a"),
        ("transaction of 100", "  the same to the storage-insert floor (shown, not judged; 0.65 proposed)",
         "0.762", "n/a"),
        ("$recognition-check", "  check p95 (s) x storage-select floor/s (shown, not judged; 70 proposed)",
         "70.320", "n/a"),
    ]
    # Without the floors (a report from before they were measured) nothing is shown.
    report["rows"] = [{k: v for k, v in row.items() if k != "floor_rps"} for row in report["rows"][1:]]
    assert not [t for t in evaluate(report) if "proposed" in t["target"]]


def _hop_row(key: str, connections: int, p50: float) -> dict[str, object]:
    return {"key": key, "connections": connections, "p50_ms": p50}


def test_the_gateway_hop_is_the_median_of_alternating_rounds_and_judged_on_it() -> None:
    rows = [_hop_row("gateway", 1, 1.10), _hop_row("direct", 1, 0.60),   # 0.50
            _hop_row("gateway", 1, 3.40), _hop_row("direct", 1, 0.70),   # 2.70: a slow moment
            _hop_row("gateway", 1, 1.20), _hop_row("direct", 1, 0.65),   # 0.55
            _hop_row("gateway", 32, 18.0), _hop_row("direct", 32, 13.5)]
    assert report.gateway_hop(rows, 1) == (0.55, [0.5, 2.7, 0.55])
    assert report.gateway_hop(rows, 32) == (4.5, [4.5])
    assert report.gateway_hop(rows, 8) == (None, [])
    judged = {"sizes": [], "loads": [], "rows": [], "distributed": {"hop": {"p50_ms": 0.55}}}
    assert [(t["measured"], t["status"]) for t in evaluate(judged) if "hop" in t["target"]] == [("0.550 ms", "pass")]
    judged["distributed"]["hop"]["p50_ms"] = 2.7
    assert [t["status"] for t in evaluate(judged) if "hop" in t["target"]] == ["miss"]
    # A run without the distributed figures (SQLite, --skip-distributed) judges nothing.
    assert [t["status"] for t in evaluate({"sizes": [], "loads": [], "rows": []}) if "hop" in t["target"]] == ["n/a"]


def _floor_round(rps: float, p99: float) -> dict[str, object]:
    return {"key": "floor-storage-read", "name": "floor: storage select by id", "rps": rps, "p99_ms": p99}


def test_a_floor_measured_in_rounds_is_its_median_round_whole() -> None:
    rounds = [_floor_round(3_075.0, 21.0), _floor_round(1_922.0, 40.0), _floor_round(2_988.0, 22.0)]
    floor = report.median_round(rounds)
    # The median round itself, its latencies with it: not a mean, not one round's rate with another's p99.
    assert (floor["rps"], floor["p99_ms"]) == (2_988.0, 22.0)
    assert floor["rps_rounds"] == [3_075.0, 1_922.0, 2_988.0]
    assert report.median_round(rounds[:2])["rps"] == 1_922.0  # even: the lower middle, a measured round
    assert report.median_round(rounds[:1])["rps_rounds"] == [3_075.0]


def test_the_table_prints_each_floors_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    row = {**report.median_round([_floor_round(3_075.0, 21.0), _floor_round(2_988.0, 22.0),
                                  _floor_round(3_037.0, 20.0)]),
           "connections": 32, "p50_ms": 9.0, "p95_ms": 15.0, "error_rate": 0.0, "stored": None}
    report.print_table({"date": "2026-11-25", "machine": {"cpu_count": 2, "cpu_model": "x"}, "database_version": "pg",
                        "workers": 2, "seconds": 5.0, "rows": [row], "loads": []})
    printed = capsys.readouterr().out
    assert "floor: storage select by id: requests/s by round 3,075, 2,988, 3,037 (the median round counts)" in printed
