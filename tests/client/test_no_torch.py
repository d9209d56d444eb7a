"""The client is the torch-free base install (`pip install ".[client]"`): it must import without torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# torch (and the server stack) made unimportable, as in an environment that never installed them.
BLOCKED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "pytriton")
SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
import client.infer, client.__main__, client.perf.run_perf, asyncdiff.contract
request = client.infer.GenerationParams("a digit", seed=3, steps=4)
print(sorted(client.infer.input_arrays(request)))
"""


def test_client_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['PROMPT', 'SEED', 'STEPS']"
