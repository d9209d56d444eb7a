"""benchmarks.soak end to end: a real tritonserver, 4 clients for 15 s, no errors allowed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from benchmarks.soak import growth_pct, summary
from serve.launcher import REPO_ROOT

LAST_LINE = re.compile(r"^soak: requests=(\d+) errors=(\d+) rss_growth_pct=(-?\d+\.\d+)$")


def test_growth_is_of_the_summed_rss():
    assert growth_pct({"a": 100, "b": 300}, {"a": 150, "b": 300}) == 12.5
    assert growth_pct({"a": 100}, {"a": 90}) == -10.0


def test_summary_ends_with_the_soak_line():
    report = {"requests": 7, "errors": 1, "seconds": 3.0, "config": {"concurrency": 2},
              "throughput_rps": 2.0, "latency_ms": {"p50": 10.0, "p99": None}, "probes": 1,
              "errors_by_kind": {"probe_mismatch": 1}, "rss_kib_start": {"tritonserver": 1024},
              "rss_kib_end": {"tritonserver": 2048}, "rss_growth_pct": 100.0}
    assert summary(report).splitlines()[-1] == "soak: requests=7 errors=1 rss_growth_pct=100.00"


def test_short_soak_has_no_errors(tiny_repo, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.25", "--concurrency", "4",
         "--model-repository", str(tiny_repo), "--probe-every-s", "3", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    requests, errors, growth = int(match[1]), int(match[2]), float(match[3])
    report = json.loads(out.read_text())
    assert errors == 0 == report["errors"]
    assert requests > 0 and requests == report["requests"] == report["ok"]
    assert report["probes"] >= 2, "the fixed-seed probe ran and matched every time"
    assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p99"] >= report["latency_ms"]["p50"]
    # The server and one stub per model of the N=2 repository, measured at both ends.
    processes = set(report["rss_kib_start"])
    assert {"tritonserver", "unet_part_0_0_0", "unet_part_1_0_0"} <= processes
    assert set(report["rss_kib_end"]) == processes
    assert abs(growth - report["rss_growth_pct"]) < 0.01
