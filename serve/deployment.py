"""``deployment.json``: what an exported repository needs from the server beside its models.

Export writes it at the repository's top level (Triton only looks at model folders, so
the file is ignored there); the launcher and the Docker entrypoint read it. Pure Python.

CUDA memory pool: a GPU output of a BLS call is allocated from Triton's CUDA pool (64 MiB
per GPU by default); past it every tensor costs cudaMalloc + CUDA IPC + cudaFree. The
recommended size per GPU is

    2 x (interface bytes per round at the export batch) x ceil(max_batch / batch)

2x because a round's outputs are allocated while the previous round's, which they
replace, are still held; max_batch / batch is how many requests can share one batched
component call. The whole round is counted on every GPU (an upper bound: a GPU only holds
what crosses into or out of its own component). Never below Triton's default.

With several resolutions (``export --resolutions``) the round is the largest one's: the
hidden/skip tensors are spatial, so a round's bytes scale with the latent area (exactly,
since every size divides by the UNet's downsampling).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FILE = "deployment.json"
TRITON_DEFAULT_POOL_BYTES = 64 << 20
MIB = 1 << 20


def cuda_pool_bytes(bytes_per_round: int, batch: int, max_batch: int) -> int:
    """The recommended CUDA memory pool per GPU, rounded up to whole MiB."""
    if bytes_per_round < 0 or not 1 <= batch <= max_batch:
        raise ValueError(f"need bytes_per_round >= 0 and 1 <= batch <= max_batch, got "
                         f"{bytes_per_round}, {batch}, {max_batch}")
    need = 2 * bytes_per_round * math.ceil(max_batch / batch)
    return max(TRITON_DEFAULT_POOL_BYTES, math.ceil(need / MIB) * MIB)


def largest_round_bytes(bytes_per_round: int, resolutions=()) -> int:
    """``bytes_per_round`` (at the first of ``resolutions``, (width, height) pixels) scaled to
    the largest one's latent area; ``bytes_per_round`` itself without resolutions."""
    if not resolutions:
        return bytes_per_round
    areas = [w * h for w, h in resolutions]
    if min(areas) <= 0:
        raise ValueError(f"resolutions must be positive (width, height) pairs, got {resolutions}")
    return math.ceil(bytes_per_round * max(areas) / areas[0])


def write(repo: str | Path, gpus: list[int] | tuple[int, ...] | None, bytes_per_round: int,
          batch: int, max_batch: int, resolutions=()) -> dict:
    """``bytes_per_round`` at the default (first) of ``resolutions`` ((width, height) pixels,
    every exported size); the pool is sized at the largest."""
    largest = largest_round_bytes(bytes_per_round, resolutions)
    info = {"gpus": None if gpus is None else list(gpus), "bytes_per_round": largest,
            "batch": batch, "max_batch": max_batch,
            "cuda_memory_pool_bytes": cuda_pool_bytes(largest, batch, max_batch)}
    if resolutions:
        info["resolutions"] = [list(r) for r in resolutions]
        info["default_bytes_per_round"] = bytes_per_round
    (Path(repo) / FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def read(repo: str | Path) -> dict | None:
    path = Path(repo) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def cuda_pool_args(gpus, pool_bytes: int) -> list[str]:
    """tritonserver flags giving each of ``gpus`` a CUDA memory pool of ``pool_bytes``."""
    if pool_bytes < 0:
        raise ValueError(f"CUDA memory pool must be >= 0 bytes, got {pool_bytes}")
    return [f"--cuda-memory-pool-byte-size={g}:{pool_bytes}" for g in gpus or ()]


def server_args(repo: str | Path, pool_mb: int | None = None) -> list[str]:
    """The CUDA pool flags for ``repo``'s GPUs: ``pool_mb`` MiB each, else the recommended
    size; none for a CPU repository or one exported before this file existed."""
    info = read(repo)
    if not info or not info.get("gpus"):
        return []
    size = info["cuda_memory_pool_bytes"] if pool_mb is None else pool_mb * MIB
    return cuda_pool_args(info["gpus"], size)


def components(repo: str | Path) -> int | None:
    """N of an exported repository (its partition file), None when it has none."""
    path = Path(repo) / "asyncdiff_stream" / "1" / "partition.json"
    return json.loads(path.read_text())["num_components"] if path.is_file() else None


def check_components(repo: str | Path, expected: int | None) -> None:
    """ValueError unless ``repo`` holds an ``expected``-component export (None: any): an
    existing repository is served as it is, never re-exported."""
    found = components(repo) if expected is not None else None
    if found is not None and found != expected:
        raise ValueError(f"{repo} holds an N={found} export, not the N={expected} asked for; "
                         f"export N={expected} elsewhere (make serve REPO=<dir> "
                         f"COMPONENTS={expected}) or remove {repo} first")


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.deployment REPO [--cuda-memory-pool-mb MB]``: the tritonserver flags."""
    p = argparse.ArgumentParser(prog="python -m serve.deployment", description=main.__doc__)
    p.add_argument("repo", type=Path)
    p.add_argument("--cuda-memory-pool-mb", type=int, help="per GPU (default: the recommended)")
    a = p.parse_args(argv)
    try:
        print(" ".join(server_args(a.repo, a.cuda_memory_pool_mb)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
