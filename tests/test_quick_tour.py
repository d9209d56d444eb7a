"""The README's Quick tour, line by line as written, against a real tritonserver.

Every line of the tour's code block is read from README.md and either run or skipped for a
reason listed in SKIPPED: a line this file does not know fails the test, so the tour and this
test change together. ``make serve`` is the session's ``tiny_server`` (the tour's export, on
free ports, which the lines reach through GRPC_PORT as `make serve`'s users would through
its defaults); the CLIs and the client run in-process through their ``main``, as ``python -m``
runs them; ``serve.openai`` runs as the process the tour starts, and is then used through the
official ``openai`` client for a generation and an edit of the tour's seven.png.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from benchmarks.openai_overhead import own_api

ROOT = Path(__file__).resolve().parents[1]
PY, TORCHRUN = ".venv/bin/python", ".venv/bin/torchrun"
# In-process: the CLIs and the client (module -> its main's module).
IN_PROCESS = {"asyncdiff.schedule": "asyncdiff.schedule", "asyncdiff.partition": "asyncdiff.partition",
              "asyncdiff.cost": "asyncdiff.cost", "asyncdiff.placement": "asyncdiff.placement",
              "client": "client.__main__"}
SKIPPED = {
    "make install": "the venv running these tests is what it builds",
    "export": "the session's tiny_repo fixture is this export (plus a second size); tests/export "
              "tests the export CLI",
    "make serve": "the session's tiny_server serves that export, on free ports",
    "client.perf.run_perf": "perf_analyzer for ~45 s; tests/client runs this recipe at concurrency 1",
    "benchmarks.concurrency": "about 3 minutes; tests/benchmarks runs a short version",
    "benchmarks.soak": "2 minutes; tests/benchmarks runs a 40 s soak",
    "deploy.render": "all 8 renderings; tests/deploy runs them (the --show line runs here)",
    "torchrun": "3 interpreters, ~11 s: runs with ASYNCDIFF_TORCHRUN_TESTS=1, as tests/runners' "
                "torchrun test does",
}


def tour() -> list[list[str]]:
    """The tour's commands as argv lists (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("\n## Quick tour\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [argv for argv in (shlex.split(line, comments=True) for line in block.splitlines()) if argv]


def kind(argv: list[str]) -> str:
    """SKIPPED's key, or the module a `.venv/bin/python -m` line runs."""
    if argv[0] == "make":
        return f"make {argv[1]}"
    if argv[0] == TORCHRUN:
        return "torchrun"
    assert argv[:2] == [PY, "-m"], f"the tour should run the venv's tools: {shlex.join(argv)}"
    if argv[2] == "deploy.render" and "--show" in argv:
        return "deploy.render --show"
    return argv[2]


def test_quick_tour_runs_as_written(tiny_server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tour's files land here
    monkeypatch.setenv("GRPC_PORT", str(tiny_server.grpc_port))
    monkeypatch.setenv("HTTP_PORT", str(tiny_server.http_port))
    ran, skipped = [], []
    for argv in tour():
        what = kind(argv)
        if what == "torchrun" and os.environ.get("ASYNCDIFF_TORCHRUN_TESTS"):
            run = subprocess.run([str(ROOT / TORCHRUN), *argv[1:]], cwd=ROOT, capture_output=True,
                                 text=True, timeout=300)
            assert run.returncode == 0 and '"equal_to_local": true' in run.stdout, run.stderr[-2000:]
        elif what in SKIPPED:
            skipped.append(f"{shlex.join(argv)}: {SKIPPED[what]}")
            continue
        elif what == "serve.openai":
            check_openai_line(argv, tiny_server, tmp_path)
        else:
            module = IN_PROCESS.get(what) or ("deploy.render" if what == "deploy.render --show" else None)
            assert module, f"a Quick tour line this test does not know: {shlex.join(argv)}"
            capsys.readouterr()
            rc = importlib.import_module(module).main(argv[3:])
            out = capsys.readouterr()
            assert rc in (None, 0), f"{shlex.join(argv)}:\n{out.err[-2000:]}"
            assert out.out.strip(), shlex.join(argv)
        ran.append(what)
    print("skipped:\n  " + "\n  ".join(skipped))
    assert {"asyncdiff.schedule", "asyncdiff.partition", "asyncdiff.cost", "asyncdiff.placement",
            "client", "serve.openai", "deploy.render --show"} <= set(ran)
    # What the client lines wrote: 256x256 PNGs of the 16x16 images, previews, img2img.
    assert Image.open("seven.png").size == (256, 256)
    assert [Image.open(f"sevens.{i}.png").size for i in range(4)] == [(256, 256)] * 4
    assert Path("image.png").is_file() and Path("image.step4.png").is_file()


def check_openai_line(argv: list[str], tiny_server, tmp_path: Path) -> None:
    """The tour's `serve.openai ... &`: its --triton-url's port is the tiny server's gRPC port,
    and it listens on a free port instead of 8080. One generation and one edit of seven.png."""
    assert argv[-1] == "&" and "--triton-url" in argv
    args = [a.replace(":8001", f":{tiny_server.grpc_port}") for a in argv[3:-1]]
    with own_api(tiny_server.grpc_url, tmp_path, args=args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        made = client.images.generate(prompt="the number seven", extra_body={"seed": 3, "steps": 8})
        edited = client.images.edit(image=open("seven.png", "rb"), prompt="the number one",
                                    extra_body={"strength": 0.6, "seed": 3, "steps": 8})
        for result in (made, edited):
            image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
            assert image.size == (16, 16) and np.asarray(image).std() > 0


@pytest.mark.parametrize("line", ["make serve", "make install"])
def test_skipped_lines_are_in_the_tour(line):
    """SKIPPED names lines the tour has (a stale entry would hide nothing, but says so)."""
    assert line in {kind(argv) for argv in tour()}
