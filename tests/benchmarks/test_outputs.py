"""No benchmark writes into benchmarks/results/ (the committed runs) unless a command names the
path: quick, smoke and full runs alike default to benchmarks/out/, which git ignores."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import OUT_DIR

REPO = Path(__file__).resolve().parents[2]


def default_outputs() -> dict[str, Path]:
    from asyncdiff.tiny import evaluate
    from benchmarks import concurrency, fidelity, gpu, openai_overhead

    # Given repositories, so that parsing exports nothing.
    repos = ["--repository", "r", "--baseline-repository", "b"]
    return {
        "concurrency": concurrency.parse_args(repos).out,
        "fidelity": fidelity.parse_args([]).json,
        "fidelity --quick": fidelity.parse_args(["--quick"]).json,
        "fidelity tiny-sd3 --quick": fidelity.parse_args(["--model", "tiny-sd3", "--quick"]).json,
        "gpu smoke": gpu.default_out(None),
        "openai_overhead": openai_overhead.OUT,
        "tiny.evaluate --quick": REPO / evaluate.parse_args(["--quick"]).out,
        "tiny.evaluate --dit": REPO / evaluate.parse_args(["--dit"]).out,
    }


def test_default_outputs_are_outside_the_committed_results():
    outputs = default_outputs()
    for what, path in outputs.items():
        assert path.resolve().parent == OUT_DIR, (what, path)
    assert outputs["fidelity --quick"].name == "fidelity_quick.json"
    assert outputs["concurrency"].name == "concurrency_tiny.json"


@pytest.mark.parametrize("path", ["build/lib/x.py", "dist/x.whl", "benchmarks/out/concurrency_tiny.json",
                                  "seven.png", "sevens.0.png", "image.step4.png", "digit.png",
                                  "latents.npy", "perf.json"])
def test_gitignore_covers_what_the_tools_write(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, timeout=30).returncode == 0


def test_committed_results_are_not_ignored():
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/concurrency_tiny.json"],
                          cwd=REPO, timeout=30).returncode == 1
