"""Run the real Triton Inference Server shipped inside the nvidia-pytriton wheel.

The wheel carries ``tritonserver`` 2.51, the Python backend and one Python
backend stub per CPython minor version. ``install`` lays these out in a work
dir (plus this project's Python-based backends) and ``TritonServer`` runs the
binary from there, bound to 127.0.0.1.

Python-based backends: for a model whose config says ``backend: "<name>"``,
tritonserver 2.51 looks for ``<backend-directory>/<name>/model.py`` and runs it
with the shared Python backend (``<backend-directory>/python/``: its
libtriton_python.so and stub). model.py alone is enough in that folder.

On a GPU host the server gets a CUDA memory pool per GPU of the repository, sized
as its ``deployment.json`` recommends (``serve.deployment``); on a CPU-only host it
gets no CUDA flag at all.

Recovery: the python backend never respawns a stub that died, and in model-control
mode NONE the repository API refuses to reload it. ``RECOVERABLE_ARGS`` (explicit
mode, every model loaded) lets ``TritonServer.reload_model`` bring it back. The dead
model version never finishes unloading, so Triton leaves its /dev/shm region behind;
``stop`` removes the regions its own server mapped.
"""

from __future__ import annotations

import ctypes
import fcntl
import filecmp
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serve import deployment

REPO_ROOT = Path(__file__).resolve().parents[1]
# Never call this folder "triton": on sys.path it shadows the triton package torch imports.
DEFAULT_WORKDIR = REPO_ROOT / ".tritonserver"
PROJECT_BACKENDS = REPO_ROOT / "backends"
HOST = "127.0.0.1"
ANY_HOST = ("0.0.0.0", "::", "")  # bind addresses that mean every interface
_INSTALL_MARK = ".installed-from"
# Explicit model control with every model loaded at start: models can be (re)loaded through
# the repository API, e.g. one whose stub died. `python -m serve`, `make serve` and the
# container start with these unless told another mode.
RECOVERABLE_ARGS = ("--model-control-mode=explicit", "--load-model=*")
SHM_DIR = Path("/dev/shm")
# Python backend regions are named triton_<backend>_backend_shm_region_<uuid>.
_STUB_REGION_MARK = "_shm_region_"


class ServerError(RuntimeError):
    """The server could not be installed, started or reached."""


def wheel_server_tree() -> Path:
    """The ``pytriton/tritonserver`` folder of the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError("nvidia-pytriton is not installed in this Python") from exc
    tree = Path(pytriton.__file__).parent / "tritonserver"
    if not (tree / "bin" / "tritonserver").is_file():
        raise ServerError(f"no bin/tritonserver under {tree}; expected nvidia-pytriton 0.7.x")
    return tree


def wheel_libs_dir() -> Path:
    """Bundled shared libraries (hashed names) that the server binary links."""
    return wheel_server_tree().parent.parent / "nvidia_pytriton.libs"


def install(workdir: Path = DEFAULT_WORKDIR, backends_src: Path = PROJECT_BACKENDS) -> Path:
    """Lay out a runnable server tree in ``workdir`` and return it.

    The wheel's tree is copied once (its per-Python stubs are left out); the
    stub for the running Python and the project's Python-based backends
    (``backends/<name>/model.py``) are refreshed on every call, cheaply.
    A file lock makes concurrent starts (e.g. parallel test runs) safe.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = wheel_server_tree()
    with open(workdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _copy_server_tree(src, workdir)
        _install_stub(src, workdir / "backends" / "python")
        for model_py in sorted(Path(backends_src).glob("*/model.py")):
            _install_file(model_py, workdir / "backends" / model_py.parent.name / "model.py")
    return workdir


def _copy_server_tree(src: Path, workdir: Path) -> None:
    mark = workdir / _INSTALL_MARK
    if mark.is_file() and mark.read_text() == str(src):
        return
    ignore = shutil.ignore_patterns("python_backend_stubs", "__pycache__")
    shutil.copytree(src, workdir, ignore=ignore, dirs_exist_ok=True)
    mark.write_text(str(src))  # last, so an interrupted copy is redone


def _install_stub(src: Path, python_backend_dir: Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"no Python backend stub for Python {version} in the wheel")
    _install_file(stub, python_backend_dir / stub.name)


def _install_file(src: Path, target: Path) -> None:
    if target.is_file() and filecmp.cmp(src, target, shallow=False):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, target)  # a running server may be reading the old file


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment the binary and its Python stubs need."""
    env = dict(os.environ if base is None else base)
    libs = [str(wheel_libs_dir())]  # the copied binary lost its $ORIGIN rpath
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs.append(sysconfig.get_config_var("LIBDIR"))  # stub embeds this libpython
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + _split(env.get("LD_LIBRARY_PATH")))
    # The stub finds its sys.prefix via `python3` on PATH; the venv must win
    # or the models cannot import numpy/torch/onnxruntime.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent)] + _split(env.get("PATH")))
    return env


def _split(value: str | None) -> list[str]:
    return [part for part in (value or "").split(os.pathsep) if part]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now; all sockets are held at once so they differ."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _gpu_visible() -> bool:
    return Path("/dev/nvidiactl").exists()


def host_args(repo: Path, gpu_visible: bool,
              cuda_memory_pool_mb: int | None = None) -> list[str]:
    """Flags that depend on the host: on a GPU host the CUDA memory pool of each GPU the
    repository uses (``deployment.json``; ``cuda_memory_pool_mb`` overrides its size); on a
    CPU-only host no CUDA flags at all."""
    if gpu_visible:
        return deployment.server_args(repo, cuda_memory_pool_mb)
    # Silences CUDA/NVML/DCGM probes that only fail on a CPU-only host.
    return ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether a listener holds ``port`` on ``host`` (binding it as the server would)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class TritonServer:
    """A tritonserver process bound to ``host`` (127.0.0.1 by default); ports left as None
    are picked free."""

    model_repository: Path
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    cuda_memory_pool_mb: int | None = None  # per GPU; None: the repository's recommendation
    # None: the work dir's backends (the wheel's python backend + this project's); else a
    # backend directory laid out by hand, as on your own Triton (docs/serving-on-triton.md).
    backend_directory: Path | None = None
    tree: Path | None = None  # an unpacked server tree (benchmarks.triton_archive); None: the wheel's
    env: dict[str, str] | None = None  # None: server_env()
    workdir: Path = DEFAULT_WORKDIR
    startup_timeout: float = 120.0
    stop_timeout: float = 30.0
    host: str = HOST  # every endpoint's bind address; 0.0.0.0: all interfaces
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: object = field(default=None, init=False, repr=False)
    _shm_regions: set[Path] = field(default_factory=set, init=False, repr=False)

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches the server."""
        return HOST if self.host in ANY_HOST else self.host

    @property
    def http_url(self) -> str:
        return f"{self.connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> "TritonServer":
        """Start and wait until ready. Call it from a thread that outlives the server: the
        parent-death signal fires when the *thread* that started the process ends."""
        if self.is_running():
            raise ServerError("server already running")
        self._pick_ports()
        tree = Path(self.tree) if self.tree else install(Path(self.workdir))
        command = [str(tree / "bin" / "tritonserver"), *self._args(tree)]
        self.log_file = Path(self.log_file or Path(self.workdir) / "logs" / f"server-{self.http_port}.log")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "wb")
        self._proc = subprocess.Popen(
            command,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env or server_env(),
            start_new_session=True,  # Ctrl-C goes to us; we stop the server in order
            preexec_fn=_die_with_parent,
        )
        self._shm_regions = set()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._note_shm_regions()
        return self

    def stop(self) -> None:
        """SIGTERM, wait for a clean exit, then kill whatever is left of the group.

        The server unloads its models (ending their stubs) in 2-3 s, but first
        waits up to its exit timeout (5 s) for open HTTP connections: close
        clients, or an idle keep-alive one costs 5 s and a forced unload.
        Then the /dev/shm regions of its stubs that Triton left behind are removed.
        """
        self._note_shm_regions()  # also those of models (re)loaded since start
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
            _kill_group(proc.pid)  # stubs that outlived a crashed server
            self._remove_shm_regions()
        if self._log is not None:
            self._log.close()
            self._log = None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stub_processes(self) -> dict[str, int]:
        """Model instance name (e.g. ``unet_part_1_0_0``) -> PID of its live python stub."""
        if not self.is_running():
            return {}
        stubs = {}
        for pid in child_pids(self._proc.pid):
            instance = stub_instance_name(pid)
            if instance is not None:
                stubs[instance] = pid
        return stubs

    def reload_model(self, name: str, timeout: float = 30.0) -> None:
        """Unload then load ``name`` (explicit model control only), e.g. after its stub died.

        A plain load of a model that is loaded and unchanged does nothing in Triton 2.51,
        so the dead stub would stay; unloading first makes the load start a new one.
        """
        import tritonclient.grpc as grpcclient  # client dependency only where used

        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            client.unload_model(name, client_timeout=timeout)
            client.load_model(name, client_timeout=timeout)
        self._note_shm_regions()

    def shm_regions(self) -> set[Path]:
        """The python-backend /dev/shm regions this server has mapped since it started."""
        self._note_shm_regions()
        return set(self._shm_regions)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        text = Path(self.log_file).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _pick_ports(self) -> None:
        """Free ports for those left as None; a given port already taken fails here, in one
        line, before anything is loaded, logged or mapped."""
        names = ("http_port", "grpc_port", "metrics_port")
        spare = iter(free_ports(3))
        for name in names:
            if getattr(self, name) is None:
                setattr(self, name, next(port for port in spare if port not in self._ports()))
        if len(set(self._ports())) != len(names):
            raise ServerError(f"ports {self._ports()}: expected three different ports")
        busy = [f"{name.split('_')[0]} {port}" for name, port in zip(names, self._ports())
                if port_in_use(port, self.host)]
        if busy:
            raise ServerError(f"port {', '.join(busy)} already in use on {self.host}: another "
                              "server (a second `make serve`?) is running there; stop it or pick "
                              "other ports (--http-port/--grpc-port/--metrics-port, or "
                              "HTTP_PORT/GRPC_PORT/METRICS_PORT for make serve)")

    def _ports(self) -> list[int | None]:
        return [self.http_port, self.grpc_port, self.metrics_port]

    def _args(self, tree: Path) -> list[str]:
        repo = Path(self.model_repository).resolve()
        if not repo.is_dir():
            raise ServerError(f"model_repository: {repo} is not a directory")
        args = [
            f"--model-repository={repo}",
            f"--backend-directory={self._backends(tree)}",
            f"--cache-directory={tree / 'caches'}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=5",
        ]
        host = host_args(repo, _gpu_visible(), self.cuda_memory_pool_mb)
        return args + host + list(self.extra_args)

    def _backends(self, tree: Path) -> Path:
        if self.backend_directory is None:
            return tree / "backends"
        return Path(self.backend_directory).resolve()

    def _note_shm_regions(self) -> None:
        # The server maps every stub's region, also the region of a stub that died.
        if self.is_running():
            self._shm_regions |= mapped_shm_regions(self._proc.pid)

    def _remove_shm_regions(self) -> None:
        """Unlink the regions of this server's stubs that outlived it (a dead stub's)."""
        for region in sorted(self._shm_regions):
            try:
                region.unlink()
            except FileNotFoundError:
                pass  # Triton removed it: the normal case
        self._shm_regions = set()

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before ready; "
                                  f"log {self.log_file}:\n{self.log_tail()}")
            if _http_ok(url):
                return
            self._note_shm_regions()  # a server that fails to start leaves its stubs' regions
            time.sleep(0.1)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s; "
                          f"log {self.log_file}:\n{self.log_tail()}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, or closed on us
        return False


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (for tritonserver: its python stubs)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def stub_instance_name(pid: int) -> str | None:
    """The model instance a python stub serves (``<model>_<group>_<index>``), else None.

    The stub's argv: stub binary, model.py path, shm region, two region sizes, parent PID,
    python backend folder, IPC message size, instance name, runtime (backend) folder.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv[0].endswith("triton_python_backend_stub") or len(argv) < 9:
        return None
    return argv[8]


def mapped_shm_regions(pid: int) -> set[Path]:
    """Python-backend shm regions that ``pid`` maps and that still exist in /dev/shm."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    regions = set()
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith(f"{SHM_DIR}/") and _STUB_REGION_MARK in path and not path.endswith("(deleted)"):
            regions.add(Path(path))
    return regions


def stub_shm_files() -> set[Path]:
    """Every python-backend region in /dev/shm now (any server's)."""
    try:
        return {p for p in SHM_DIR.iterdir() if _STUB_REGION_MARK in p.name}
    except OSError:
        return set()


def _kill_group(pid: int) -> None:
    # The server leads its own session, so its Python stubs share its group.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _load_libc():
    try:
        return ctypes.CDLL(None)  # loaded up front: the forked child must not dlopen
    except OSError:
        return None


_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child: get SIGTERM when the launcher dies, so no server is orphaned."""
    if _LIBC is not None and sys.platform.startswith("linux"):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
