"""The Docker files agree with each other, with the placement rule and with pyproject.toml.

Docker cannot run here; these checks read the files the image is built and started from.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from asyncdiff import placement

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)")


def shell_defaults(text: str) -> dict[str, str]:
    """``${NAME:-default}`` expansions of a shell script or compose file."""
    return dict(re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", text))


def pins(lines) -> dict[str, str]:
    found = (PIN.match(line.strip()) for line in lines)
    return {m[1].lower(): m[2] for m in found if m}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_defaults_agree_across_dockerfile_compose_and_entrypoint(compose):
    entry = shell_defaults((DOCKER / "entrypoint.sh").read_text())
    env = {k: shell_defaults(v).get(k, v) for k, v in compose["services"]["asyncdiff"]
           ["environment"].items()}
    env_line = re.search(r"^ENV MODEL_REPOSITORY=.*$", (DOCKER / "Dockerfile").read_text(), re.M)[0]
    dockerfile_env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    for name in ("STRIDE", "BATCHED_STRIDE", "VALIDATE", "MODEL"):
        assert env[name] == entry[name], name
    assert dockerfile_env["STRIDE"] == entry["STRIDE"] and dockerfile_env["MODEL"] == entry["MODEL"]
    assert dockerfile_env["MODEL_REPOSITORY"] == entry["MODEL_REPOSITORY"]
    assert entry["VALIDATE"] == "0"  # no CPU parity checks at start unless asked


@pytest.mark.parametrize("stride", ["1", "2"])
def test_compose_gpu_count_fits_the_placement(compose, stride, capsys):
    """What the entrypoint runs for compose's default GPU count, at each stride."""
    devices = compose["services"]["asyncdiff"]["deploy"]["resources"]["reservations"]["devices"]
    gpu_count = int(shell_defaults(str(devices[0]["count"]))["GPU_COUNT"])
    gpus = ",".join(map(str, range(gpu_count)))
    assert placement.main(["--gpus", gpus, "--stride", stride, "--batched-stride", "auto",
                           "--export-args"]) == 0
    args = capsys.readouterr().out.split()
    assert args[:6] == ["--components", str(gpu_count), "--stride", stride, "--gpus", gpus]
    assert ("--batched-stride" in args) == (stride == "2")  # S=2 on the same GPUs: batched


def test_python_310_pins_match_pyproject_or_are_documented():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = pins([*project["dependencies"], *(d for deps in project["optional-dependencies"].values()
                                            for d in deps)])
    lines = (DOCKER / "requirements-py310.txt").read_text().splitlines()
    docker = pins(lines)
    header = "\n".join(line for line in lines if line.startswith("#"))
    documented = {(m[0].lower(), m[1]): (m[2].lower() if m[2] else m[0].lower(), m[3])
                  for m in re.findall(r"([A-Za-z][\w-]*) ([\d.]+) -> (?:([A-Za-z][\w-]*) )?([\d.]+)",
                                      header)}
    assert "onnxruntime" not in docker, "the image needs onnxruntime-gpu, not the CPU build"
    stale = set(documented) - set(ours.items())
    assert not stale, f"requirements-py310.txt documents pyproject pins that changed: {stale}"
    for name, version in ours.items():
        if (name, version) in documented:
            new_name, new_version = documented[(name, version)]
            assert docker.get(new_name) == new_version, (name, version, new_name, new_version)
        elif name in docker:
            assert docker[name] == version, f"{name}: pyproject {version}, docker {docker[name]}"
    assert docker["tritonclient"] == "2.51.0"  # the server version of the 24.10 container
    assert "tritonserver:24.10" in (DOCKER / "Dockerfile").read_text()
    assert docker["onnxruntime-gpu"] and docker["torch"].startswith("2.10.")


def test_image_copies_every_package_pyproject_installs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = set(re.findall(r"^COPY (\w+) \1$", (DOCKER / "Dockerfile").read_text(), re.M))
    assert set(packages) <= copied, set(packages) - copied
