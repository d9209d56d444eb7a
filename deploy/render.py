"""Render the asyncdiff Helm chart with real Helm and validate every manifest.

Helm's own Go engine renders the chart (``helm-python-sdk``: Helm v4's SDK as a shared
library in a wheel, no ``helm`` binary). Built-in kinds are validated against the
Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships (strict: unknown fields
fail); the PodMonitor, a prometheus-operator CRD those schemas lack, against the subset
of its schema in ``schemas/``, written for the fields this chart sets.

``python -m deploy.render`` renders and validates N = 1..4, S = 1..2 (the CI matrix);
``--set asyncdiff.components=3 --show`` prints one rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "asyncdiff"
ADAPTER_VALUES = DEPLOY / "helm" / "prometheus-adapter-values.yaml"
SCHEMAS = DEPLOY / "schemas"
# The oldest and the newest Kubernetes schemas that kubernetes-validate ships: manifests must
# fit both (a field removed or added in between fails one of them).
KUBERNETES_VERSIONS = ("1.25", "1.37")
# Every value that turns an optional manifest on: the matrix renders all of them.
EVERYTHING_ON = {"autoscaling": {"enabled": True}, "openai": {"enabled": True},
                 "monitoring": {"podMonitor": {"enabled": True}}}


@dataclass(frozen=True)
class Layout:
    """The AsyncDiff settings a release is rendered for (the chart's ``asyncdiff`` values)."""
    components: int
    stride: int = 1
    batched_stride: bool = False
    layout: str = "sequential"

    def values(self) -> dict:
        return {"asyncdiff": {"components": self.components, "stride": self.stride,
                              "batchedStride": self.batched_stride, "layout": self.layout}}


def matrix() -> list[Layout]:
    """N = 1..4 x S = 1..2; with S=2 and N > 1 both plain (N+1 GPUs) and batched stride."""
    layouts = []
    for n in range(1, 5):
        layouts.append(Layout(n, 1))
        layouts.append(Layout(n, 2))
        if n > 1:
            layouts.append(Layout(n, 2, batched_stride=True))
    return layouts


def merged(*values: dict) -> dict:
    """Nested dicts merged left to right (later wins), as Helm merges ``-f`` files."""
    out: dict = {}
    for layer in values:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def render(values: dict | None = None, release: str = "asyncdiff",
           namespace: str = "default") -> list[dict]:
    """The chart's manifests for ``values`` (merged over values.yaml), parsed."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=release, namespace=namespace)
    docs = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def validate(manifest: dict, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> None:
    """Raise if ``manifest`` does not match its kind's schema in each of ``versions``
    (``ValueError`` for a kind with no schema here)."""
    import kubernetes_validate

    schema = SCHEMAS / f"{manifest['kind'].lower()}.json"
    if schema.is_file():
        import jsonschema

        jsonschema.validate(manifest, json.loads(schema.read_text()))
        return
    try:
        for version in versions:
            kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ValueError(f"no schema for {manifest['apiVersion']} {manifest['kind']}") from e


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    """``{kind: manifest}``; the chart renders at most one manifest of each kind."""
    kinds = [m["kind"] for m in manifests]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"several manifests of one kind: {kinds}")
    return dict(zip(kinds, manifests))


def check_matrix() -> int:
    """Render and validate every layout of ``matrix()`` with everything on; manifests checked."""
    count = 0
    for layout in matrix():
        for manifest in render(merged(EVERYTHING_ON, layout.values())):
            validate(manifest)
            count += 1
    return count


def _set(values: dict, assignment: str) -> dict:
    """``a.b=v`` (v parsed as YAML) merged into ``values``."""
    path, _, raw = assignment.partition("=")
    layer: dict = yaml.safe_load(raw)
    for key in reversed(path.split(".")):
        layer = {key: layer}
    return merged(values, layer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a value (dotted key, YAML value); repeatable")
    p.add_argument("--show", action="store_true", help="print the manifests of these values")
    a = p.parse_args(argv)
    try:
        return _run(a)
    except Exception as e:  # a value Helm refuses (the chart's `fail`) or an invalid manifest
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    if a.show or a.set:
        values: dict = {}
        for assignment in a.set:
            values = _set(values, assignment)
        manifests = render(values)
        for manifest in manifests:
            validate(manifest)
        if a.show:
            print(yaml.safe_dump_all(manifests, sort_keys=False), end="")
        print(f"{len(manifests)} manifests valid", file=sys.stderr)
        return 0
    count = check_matrix()
    print(f"{len(matrix())} layouts, {count} manifests rendered by Helm and valid "
          f"(Kubernetes {' and '.join(KUBERNETES_VERSIONS)} schemas, strict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
