"""The Helm chart (deploy/helm/asyncdiff), rendered by real Helm (helm-python-sdk: Helm's Go
SDK) and validated against the Kubernetes schemas; its scripts run here with a stand-in
tritonserver; its autoscaling metric read from the real tritonserver of ``tiny_server``.

No cluster runs here: what a cluster would do with these manifests is not tested."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from asyncdiff.contract import MODEL_NAME
from asyncdiff.placement import Placement
from deploy import render
from export import cli as export_cli
from serve import deployment, launcher

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "kubernetes.md"
MIB = deployment.MIB


def pod_spec(manifests: list[dict]) -> dict:
    return render.by_kind(manifests)["Deployment"]["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def export_argv(spec: dict) -> list[str]:
    """The arguments the init container gives `python3 -m export` (without --out)."""
    script = container(spec, "export")["args"][0]
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("python3 -m export"))
    words = shlex.split(line)[3:]
    return words[:words.index("--out")]


def gpu_request(c: dict) -> int:
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]  # extended resources: equal
    return int(limits["nvidia.com/gpu"])


@pytest.mark.parametrize("layout", render.matrix(), ids=lambda x: f"N{x.components}S{x.stride}"
                         f"{'b' if x.batched_stride else ''}")
def test_chart_renders_valid_manifests_for_the_placement(layout):
    """N = 1..4 x S = 1..2 (plain and batched), every optional manifest on: each manifest is
    valid, and both containers that touch GPUs request the placement's GPU count."""
    manifests = render.render(render.merged(render.EVERYTHING_ON, layout.values()))
    for manifest in manifests:
        render.validate(manifest)
    assert sorted(m["kind"] for m in manifests) == [
        "Deployment", "HorizontalPodAutoscaler", "PodMonitor", "Service"]
    spec = pod_spec(manifests)
    world = Placement(layout.components, layout.stride, layout.batched_stride).world_size
    assert gpu_request(container(spec, "tritonserver")) == world
    assert gpu_request(container(spec, "export")) == world
    assert "nvidia.com/gpu" not in container(spec, "openai")["resources"].get("limits", {})


@pytest.mark.parametrize("stride,batched", [(1, False), (2, False), (2, True)])
def test_changing_n_changes_gpus_export_args_and_cuda_pool_together(stride, batched, tmp_path):
    """For N = 1..4: the GPU request, the export's own parse of the rendered arguments, and the
    CUDA pool flags (sized in the chart, or from the deployment.json that export writes for
    those GPUs) all name the GPUs asyncdiff.placement gives."""
    counts = []
    for n in range(1, 5):
        if batched and n == 1:
            continue  # plain and batched stride agree at N=1; rendered by the matrix above
        place = Placement(n, stride, batched)
        layout = render.Layout(n, stride, batched)
        spec = pod_spec(render.render(render.merged(layout.values(),
                                                    {"triton": {"cudaMemoryPoolMB": 256}})))
        assert gpu_request(container(spec, "tritonserver")) == place.world_size
        opts = export_cli.parse_args(export_argv(spec) + ["--out", str(tmp_path)])
        assert (opts.components, opts.stride, opts.batched_stride) == (n, stride, batched)
        assert export_cli.placement(opts) == Placement(n, stride, batched,
                                                       tuple(range(place.world_size)))
        assert opts.backend == "tensorrt" and opts.build_engines
        pool = served_args(spec, tmp_path / f"n{n}")
        assert pool_flags(pool) == deployment.cuda_pool_args(range(place.world_size), 256 * MIB)
        # Pool left to the repository: the size export recommends, on the GPUs it exported for.
        spec = pod_spec(render.render(layout.values()))
        repo = tmp_path / f"repo{n}"
        repo.mkdir()
        info = deployment.write(repo, opts.gpus, 40 * MIB, batch=2, max_batch=8)
        assert pool_flags(served_args(spec, repo)) == deployment.cuda_pool_args(
            range(place.world_size), info["cuda_memory_pool_bytes"])
        counts.append(place.world_size)
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # N moves them all


def pool_flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--cuda-memory-pool-byte-size=")]


def fake_bin(tmp_path: Path, argv_file: Path) -> Path:
    """A PATH folder: `tritonserver` writes its argv, one per line; `python3` is this Python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "tritonserver").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\n')
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_container(c: dict, tmp_path: Path, repo: Path, env: dict | None = None) -> list[str]:
    """Run a container's bash script here, its repository path pointed at ``repo``; the argv a
    stand-in tritonserver received."""
    argv_file = tmp_path / "tritonserver.argv"
    argv_file.unlink(missing_ok=True)
    args = [a.replace(render_repo(), str(repo)) for a in c["args"]]
    path = f"{fake_bin(tmp_path, argv_file)}{os.pathsep}{os.environ['PATH']}"
    subprocess.run([*c["command"], *args], check=True, cwd=tmp_path, timeout=60,
                   env={**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), **(env or {})})
    return argv_file.read_text().splitlines() if argv_file.exists() else []


def render_repo() -> str:
    values = yaml.safe_load((render.CHART / "values.yaml").read_text())["modelRepository"]
    return f"{values['mountPath']}/{values['path']}"


def served_args(spec: dict, repo: Path) -> list[str]:
    return run_container(container(spec, "tritonserver"), repo.parent, repo)


def test_tritonserver_starts_with_the_launchers_flags(tmp_path):
    """The main container's script, run here: the repository, explicit model control with every
    model loaded (serve.launcher.RECOVERABLE_ARGS), the Service's ports, extra flags last."""
    manifests = render.render({"triton": {"extraArgs": ["--log-verbose=1"]}})
    spec = pod_spec(manifests)
    repo = tmp_path / "repo"
    repo.mkdir()
    argv = served_args(spec, repo)
    assert argv[0] == f"--model-repository={repo}"
    assert set(launcher.RECOVERABLE_ARGS) <= set(argv)
    ports = {p["name"]: p["port"] for p in render.by_kind(manifests)["Service"]["spec"]["ports"]}
    assert {f"--{name}-port={port}" for name, port in ports.items()} <= set(argv)
    assert argv[-1] == "--log-verbose=1"
    assert pool_flags(argv) == []  # a CPU repository (no deployment.json): no CUDA pool


def test_export_init_container_exports_once_then_keeps_the_repository(tmp_path):
    """The init container's script with a stand-in `python3 -m export`: it exports into
    <repo>.partial and renames it; a restart with the same settings exports nothing."""
    spec = pod_spec(render.render({"asyncdiff": {"components": 3, "stride": 2}}))
    export = container(spec, "export")
    stand_in = tmp_path / "export_stand_in"
    (stand_in / "export").mkdir(parents=True)
    calls = tmp_path / "export.calls"
    (stand_in / "export" / "__main__.py").write_text(
        "import sys, pathlib\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir()\n"
        "(out / 'deployment.json').write_text('{}')\n")
    repo = tmp_path / "models" / "repository"
    repo.parent.mkdir()
    for _ in range(2):
        run_container(export, tmp_path, repo, env={"PYTHONPATH": str(stand_in)})
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"--out {repo}.partial")
    assert (repo / "deployment.json").is_file() and not Path(f"{repo}.partial").exists()
    marker = (repo / ".asyncdiff-export").read_text().strip()
    assert marker == " ".join(export_argv(spec)) == lines[0].rsplit(" --out", 1)[0]


def test_probes_shm_service_and_sidecar():
    manifests = render.render({"openai": {"enabled": True}})
    spec = pod_spec(manifests)
    triton = container(spec, "tritonserver")
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    ports = {p["name"]: p["port"] for p in render.by_kind(manifests)["Service"]["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 8080}
    sidecar = container(spec, "openai")
    assert sidecar["command"] == ["python3", "-m", "serve.openai"]
    assert "--triton-url=127.0.0.1:8001" in sidecar["args"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/health"


def test_pvc_repository_is_mounted_read_only_without_export():
    spec = pod_spec(render.render({"modelRepository": {"source": "pvc",
                                                       "pvc": {"claimName": "asyncdiff-n2"}}}))
    assert "initContainers" not in spec
    volume = next(v for v in spec["volumes"] if v["name"] == "model-repository")
    assert volume["persistentVolumeClaim"] == {"claimName": "asyncdiff-n2", "readOnly": True}
    # Exporting into a claim instead of an emptyDir: the init container stays, writable.
    spec = pod_spec(render.render({"modelRepository": {"export": {"claimName": "built"}}}))
    volume = next(v for v in spec["volumes"] if v["name"] == "model-repository")
    assert volume == {"name": "model-repository", "persistentVolumeClaim": {"claimName": "built"}}
    assert [c["name"] for c in spec["initContainers"]] == ["export"]


@pytest.mark.parametrize("values,message", [
    ({"asyncdiff": {"stride": 1, "batchedStride": True}}, "batchedStride only applies to stride 2"),
    ({"asyncdiff": {"stride": 3}}, "stride must be 1 or 2"),
    ({"asyncdiff": {"components": 0}}, "components must be >= 1"),
    ({"modelRepository": {"source": "pvc"}}, "needs modelRepository.pvc.claimName"),
])
def test_impossible_values_fail_to_render(values, message):
    with pytest.raises(Exception, match=re.escape(message)):
        render.render(values)


def test_validation_is_strict():
    """An unknown or mistyped field fails, for built-in kinds and for the PodMonitor."""
    manifests = render.by_kind(render.render(render.EVERYTHING_ON))
    deploy = manifests["Deployment"]
    typo = {**deploy, "spec": {**deploy["spec"], "replica": 2}}
    wrong_type = {**deploy, "spec": {**deploy["spec"], "replicas": "two"}}
    monitor = manifests["PodMonitor"]
    unknown = {**monitor, "spec": {**monitor["spec"], "podMetricEndpoints": []}}
    for manifest in (typo, wrong_type, unknown):
        with pytest.raises(Exception, match="replica|two|podMetricEndpoints"):
            render.validate(manifest)
    with pytest.raises(ValueError, match="no schema"):
        render.validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}})


def test_chart_lints_clean():
    import helm_python as helm

    result = helm.lint(str(render.CHART))
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_hpa_metric_is_the_adapter_rule_on_the_asyncdiff_queue():
    hpa = render.by_kind(render.render({"autoscaling": {"enabled": True,
                                                        "targetQueueTimeMs": 750}}))
    metric = hpa["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]
    rule, = yaml.safe_load(render.ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert metric["metric"]["name"] == rule["name"]["as"]
    assert metric["target"] == {"type": "AverageValue", "averageValue": "750000"}  # µs
    assert f'model="{MODEL_NAME}"' in rule["seriesQuery"]
    assert rule["metricsQuery"].count(f'model="{MODEL_NAME}"') == 2


def metric_values(url: str, name: str) -> float:
    """Sum of ``name``'s samples for the asyncdiff model in a Prometheus text scrape."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = re.compile(rf'^{name}{{[^}}]*model="{MODEL_NAME}"[^}}]*}} (\S+)$', re.M)
    samples = pattern.findall(text)
    assert samples, f"{name} for {MODEL_NAME} not in the scrape"
    return sum(float(s) for s in samples)


def test_adapter_metric_rises_when_requests_wait_for_a_slot(tiny_server):
    """The adapter's query on the real server's metrics: queue µs / successful requests of the
    asyncdiff model. One request alone barely queues; twice max_batch_requests (4) at once
    make half of them wait for a slot."""
    from client.infer import GenerationParams, generate

    rule, = yaml.safe_load(render.ADAPTER_VALUES.read_text())["rules"]["custom"]
    queue, served = re.findall(r"rate\((\w+)\{", rule["metricsQuery"])

    def mean_queue_us(requests: int) -> float:
        before = [metric_values(tiny_server.metrics_url, m) for m in (queue, served)]
        params = [GenerationParams("a handwritten digit 7", seed=i, steps=4) for i in range(requests)]
        with ThreadPoolExecutor(requests) as pool:
            list(pool.map(lambda p: generate(p, url=tiny_server.grpc_url), params))
        after = [metric_values(tiny_server.metrics_url, m) for m in (queue, served)]
        assert after[1] - before[1] == requests
        return (after[0] - before[0]) / (after[1] - before[1])

    alone, crowded = mean_queue_us(1), mean_queue_us(8)
    print(f"mean queue time: {alone:.0f} µs alone, {crowded:.0f} µs with 8 requests at once")
    assert crowded > 10_000 and crowded > 10 * alone


def value_paths(values: dict, doc: str, prefix: str = "") -> tuple[list[str], list[str]]:
    """(documented, missing): value paths with a row ``| `path` |`` in ``doc``'s table; a dict
    with a row (resources, probes.startup) counts as one value."""
    documented, missing = [], []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if f"| `{path}` |" in doc:
            documented.append(path)
        elif isinstance(value, dict) and value:
            more, lacking = value_paths(value, doc, f"{path}.")
            documented += more
            missing += lacking
        else:
            missing.append(path)
    return documented, missing


def key_lines(text: str) -> dict[str, int]:
    """Dotted path of every `key:` line of a YAML file in block style -> its line index."""
    stack: list[tuple[int, str]] = []
    found = {}
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m[1])
        stack = [(d, k) for d, k in stack if d < indent] + [(indent, m[2])]
        found[".".join(k for _, k in stack)] = i
    return found


def test_every_value_is_documented():
    """Every value has a row in docs/kubernetes.md and a comment right above it in values.yaml."""
    text = (render.CHART / "values.yaml").read_text()
    documented, missing = value_paths(yaml.safe_load(text), DOCS.read_text())
    assert missing == []
    lines, where = text.splitlines(), key_lines(text)
    uncommented = [p for p in documented if not lines[where[p] - 1].lstrip().startswith("#")]
    assert uncommented == []
