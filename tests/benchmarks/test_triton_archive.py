"""The trimmed tritonserver archive: what it keeps, what it leaves out, that it unpacks runnable."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

from benchmarks import triton_archive

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    # xz -0: seconds instead of minutes; the members are what is under test.
    return triton_archive.build(tmp_path_factory.mktemp("archive") / "ts.tar.xz", VERSION, preset=0)


def test_keeps_the_server_the_python_backend_and_one_stub(archive):
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        infos = tar.getmembers()
    assert {"bin/tritonserver", "backends/python/libtriton_python.so",
            "backends/python/triton_python_backend_utils.py",
            "backends/python/triton_python_backend_stub"} <= names
    libs = {n for n in names if n.startswith("lib/")}
    assert any(n.startswith("lib/libtritonserver") for n in libs)
    assert not any("libpython3" in n for n in libs)  # the wheel's libpython3.13: nobody loads it
    assert not any("python_backend_stubs" in n for n in names)
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 for i in infos)  # reproducible bytes


def test_unpacked_binaries_find_every_library(archive, tmp_path):
    tree = triton_archive.unpack(archive, tmp_path)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(triton_archive.library_path(tree)))
    for binary in ("bin/tritonserver", "backends/python/libtriton_python.so",
                   "backends/python/triton_python_backend_stub"):
        out = subprocess.run(["ldd", str(tree / binary)], env=env, capture_output=True, text=True,
                             check=True).stdout
        assert "not found" not in out, f"{binary}:\n{out}"
    assert os.access(tree / "bin" / "tritonserver", os.X_OK)
    (version_line,) = (tree / "PYTHON_VERSION").read_text().split()
    assert version_line == VERSION


def test_a_stub_the_wheel_lacks_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"no stub for Python 3\.99"):
        triton_archive.build(tmp_path / "x.tar.xz", "3.99", preset=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_python_version_is_rejected(capsys):
    with pytest.raises(SystemExit):
        triton_archive.main(["--python", "312", "--out", "x.tar.xz"])
    assert "--python must be a minor version like 3.12" in capsys.readouterr().err
