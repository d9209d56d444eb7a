"""A trimmed ``tritonserver`` tree from the nvidia-pytriton wheel, as one .tar.xz that
travels with the repository to a host that has no such wheel (the GPU check's machine).

``python -m benchmarks.triton_archive --python 3.12 --out .triton/tritonserver-py312.tar.xz``

Kept: ``bin/tritonserver``, the Python backend (``libtriton_python.so``, its utils module
and the stub for one Python minor version), ``caches/`` and, in ``lib/``, exactly the
wheel's bundled libraries that these binaries load (their ``ldd`` closure, resolved in
the wheel's ``nvidia_pytriton.libs``; about 85 of its 115 MB: libpython3.13 and the
other stubs are left out). The stub links ``libpythonX.Y.so.1.0`` dynamically; a host
whose Python is not built shared lacks it, so ``--with-libpython`` adds one (from a
shared-built ``pythonX.Y`` on PATH) under ``libpython/``, which ``unpack``'s users put
last on LD_LIBRARY_PATH: the host's own libpython wins when it has one.

Members are sorted, owned by root and dated 0, so the same wheel gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

BIN = "bin/tritonserver"
PYTHON_BACKEND = "backends/python"
STUB = "triton_python_backend_stub"
LIBS = "lib"  # bin/tritonserver's RPATH has ${ORIGIN}/../lib: it finds them unaided
LIBPYTHON = "libpython"
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)")


def wheel_paths() -> tuple[Path, Path]:
    """(the wheel's ``pytriton/tritonserver`` tree, its ``nvidia_pytriton.libs``)."""
    from serve.launcher import wheel_libs_dir, wheel_server_tree
    return wheel_server_tree(), wheel_libs_dir()


def bundled_closure(binaries: list[Path], libs_dir: Path) -> list[Path]:
    """The libraries of ``libs_dir`` that ``binaries`` load, directly or not (``ldd``)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(libs_dir))
    needed: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True,
                             check=True, timeout=60).stdout
        for line in out.splitlines():
            match = _LDD_LINE.match(line)
            if match and Path(match[2]).resolve().parent == libs_dir.resolve():
                needed.add(libs_dir / match[1])
    return sorted(needed)


def find_libpython(version: str) -> Path:
    """``libpythonX.Y.so.1.0`` of a shared-built ``pythonX.Y`` on PATH."""
    exe = shutil.which(f"python{version}")
    if exe is None:
        raise SystemExit(f"--with-libpython: no python{version} on PATH")
    code = ("import sysconfig as s; print(s.get_config_var('Py_ENABLE_SHARED') or 0);"
            "print(s.get_config_var('LIBDIR')); print(s.get_config_var('INSTSONAME'))")
    shared, libdir, soname = subprocess.run([exe, "-c", code], capture_output=True, text=True,
                                            check=True, timeout=60).stdout.split()
    lib = Path(libdir) / soname
    if shared != "1" or not lib.is_file():
        raise SystemExit(f"--with-libpython: {exe} is not built shared (no {lib})")
    return lib


def members(version: str, libpython: Path | None = None) -> dict[str, Path]:
    """Archive name -> source file."""
    tree, libs_dir = wheel_paths()
    stub = tree / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        raise SystemExit(f"--python: the wheel has no stub for Python {version}; it has "
                         f"{sorted(p.name for p in (tree / 'python_backend_stubs').iterdir())}")
    backend = tree / PYTHON_BACKEND
    out = {BIN: tree / BIN,
           f"{PYTHON_BACKEND}/libtriton_python.so": backend / "libtriton_python.so",
           f"{PYTHON_BACKEND}/triton_python_backend_utils.py": backend / "triton_python_backend_utils.py",
           f"{PYTHON_BACKEND}/{STUB}": stub}
    for path in sorted((tree / "caches").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            out[str(path.relative_to(tree))] = path
    for lib in bundled_closure([tree / BIN, backend / "libtriton_python.so", stub], libs_dir):
        out[f"{LIBS}/{lib.name}"] = lib
    if libpython is not None:
        out[f"{LIBPYTHON}/{libpython.name}"] = libpython
    return out


def _stripped(src: Path, workdir: Path) -> Path:
    """A copy of ``src`` without symbols (a pyenv libpython: 30 MB -> 7 MB), when binutils'
    ``strip`` is at hand; else ``src``."""
    strip = shutil.which("strip")
    if strip is None:
        return src
    target = workdir / src.name
    subprocess.run([strip, "--strip-unneeded", "-o", str(target), str(src)], check=True, timeout=120)
    return target


def build(out: Path, version: str, preset: int = 9, libpython: Path | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    with tempfile.TemporaryDirectory() as work:
        files = members(version, libpython and _stripped(libpython, Path(work)))
        try:
            with tarfile.open(tmp, "w:xz", preset=preset) as tar:
                for name, src in files.items():
                    info = tar.gettarinfo(str(src), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    info.mtime = 0
                    with open(src, "rb") as f:
                        tar.addfile(info, f)
                tar.addfile(*_text_member("PYTHON_VERSION", version + "\n"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, out)  # never a half-written archive under the final name
    return out


def _text_member(name: str, text: str) -> tuple[tarfile.TarInfo, io.BytesIO]:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def unpack(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` (a server tree: bin/, lib/, backends/python/)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # keeps the exec bits, refuses odd paths
    return dest


def library_path(tree: Path) -> list[str]:
    """LD_LIBRARY_PATH entries for an unpacked tree: its libs, the running Python's shared
    libpython when it has one, the archive's fallback libpython last."""
    paths = [str(tree / LIBS)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        paths.append(sysconfig.get_config_var("LIBDIR"))
    if (tree / LIBPYTHON).is_dir():
        paths.append(str(tree / LIBPYTHON))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_archive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the Python minor version (X.Y) of the host that will serve")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", type=int, default=9, choices=range(10), metavar="0-9",
                   help="xz preset (default 9: smallest, about a minute)")
    p.add_argument("--with-libpython", action="store_true",
                   help="also carry libpythonX.Y.so.1.0 from a shared pythonX.Y on PATH")
    a = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", a.python):
        p.error(f"--python must be a minor version like 3.12, got {a.python!r}")
    libpython = find_libpython(a.python) if a.with_libpython else None
    start = time.monotonic()
    out = build(a.out, a.python, a.preset, libpython)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (xz -{a.preset}, Python {a.python}, "
          f"{time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
