"""benchmarks.concurrency: perf_analyzer against real servers, and how replicas are combined.

The end-to-end test is the quick version (about 30-40 s on the 2-core machine): only the
two-replica deployment (two servers started side by side on the tiny N=2 repository),
concurrency 1 and 2, 3 windows of 1 s each.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.concurrency import combine, input_data, main, markdown, split_concurrency


def test_concurrency_is_split_between_replicas():
    assert split_concurrency(8, 2) == [4, 4]
    assert split_concurrency(3, 2) == [2, 1]
    assert split_concurrency(1, 2) == [1]  # the other replica idles
    assert split_concurrency(4, 1) == [4]


def test_replicas_add_throughput_and_keep_the_worse_latency():
    level = combine(4, [{"throughput": 3.0, "p50_ms": 100.0, "p99_ms": 300.0},
                        {"throughput": 2.5, "p50_ms": 120.0, "p99_ms": 250.0}])
    assert (level.throughput, level.p50_ms, level.p99_ms) == (5.5, 120.0, 300.0)


def test_input_data_has_one_element_per_input():
    rows = input_data(steps=5)["data"]
    assert len(rows) == 10 and len({row["PROMPT"][0] for row in rows}) == 10
    assert all(row["STEPS"] == [5] and len(row["SEED"]) == 1 for row in rows)


def test_markdown_has_a_row_per_level_and_columns_per_deployment():
    level = {"concurrency": 1, "throughput": 2.0, "p50_ms": 10.0, "p99_ms": 20.0}
    report = {"deployments": {"n1": {"label": "N=1", "levels": [level]},
                              "replicas": {"label": "2×N=1", "levels": [level]}}}
    lines = markdown(report).splitlines()
    assert lines[0].startswith("| concurrency | N=1 infer/s | p50 ms | p99 ms | 2×N=1 infer/s")
    assert lines[2] == "| 1 | 2.00 | 10 | 20 | 2.00 | 10 | 20 |"


def test_two_replicas_measured_by_perf_analyzer(tiny_repo, tmp_path, capsys):
    out = tmp_path / "concurrency.json"
    assert main(["--concurrency", "1,2", "--interval-ms", "1000", "--deployments", "replicas",
                 "--baseline-repository", str(tiny_repo), "--steps", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    levels = report["deployments"]["replicas"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    assert [len(lv["per_process"]) for lv in levels] == [1, 2]  # c=2: one perf_analyzer per replica
    for lv in levels:
        assert lv["throughput"] > 0 and 0 < lv["p50_ms"] <= lv["p99_ms"]
        assert lv["throughput"] == pytest.approx(sum(p["throughput"] for p in lv["per_process"]))
        assert lv["p99_ms"] == max(p["p99_ms"] for p in lv["per_process"])
    urls = {p["url"] for p in levels[1]["per_process"]}
    assert len(urls) == 2, "each perf_analyzer against its own server"
    assert "| 2 | " in capsys.readouterr().out
