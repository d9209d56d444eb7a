"""Benchmarks. A run writes its JSON under ``benchmarks/out/`` (ignored by git) unless a
path is given: the committed runs in ``benchmarks/results/`` change only when a command
names them (``--out benchmarks/results/...``, ``--json ...``)."""

from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"


def output_path(name: str) -> Path:
    """Where a run writes ``name`` when no path was given."""
    return OUT_DIR / name
