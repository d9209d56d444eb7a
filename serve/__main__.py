"""Run tritonserver on a model repository until Ctrl-C or SIGTERM.

    python -m serve --model-repository model_repository [--host 127.0.0.1] [--http-port 8000]
                    [--cuda-memory-pool-mb MB] [-- --log-verbose=1]

The three ports are checked first: one already taken (a second `make serve`) fails at
once, before any model is loaded or the running server's log is touched.

Models are under explicit control (--model-control-mode=explicit --load-model=*) unless the
tritonserver arguments name another --model-control-mode: a model whose stub died can then
be brought back without a restart, by unloading and loading it through the repository API
(POST /v2/repository/models/<name>/unload, then .../load).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from serve import deployment
from serve.launcher import ANY_HOST, DEFAULT_WORKDIR, HOST, RECOVERABLE_ARGS, ServerError, TritonServer

# tritonserver flags this launcher sets itself: given after --, they would make the banner lie.
OWN_FLAGS = {f"--{kind}-{what}": f"--{'host' if what == 'address' else kind + '-port'}"
             for kind in ("http", "grpc", "metrics") for what in ("address", "port")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--components", type=int, metavar="N",
                        help="refuse unless the repository is an N-component export")
    parser.add_argument("--host", default=HOST,
                        help="address of all three endpoints; 0.0.0.0 for every interface "
                        "(default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=_env_port("HTTP_PORT", 8000))
    parser.add_argument("--grpc-port", type=int, default=_env_port("GRPC_PORT", 8001))
    parser.add_argument("--metrics-port", type=int, default=_env_port("METRICS_PORT", 8002))
    parser.add_argument("--log-file", type=Path, default=None,
                        help="server log (default: <workdir>/logs/server-<http port>.log)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--cuda-memory-pool-mb", type=int, default=None,
                        help="CUDA memory pool per GPU the repository uses (default: the size "
                        "export recommends in deployment.json; ignored on a CPU-only host)")
    parser.add_argument("extra_args", nargs="*", metavar="-- TRITONSERVER_ARG",
                        help="passed to tritonserver as is, e.g. -- --log-verbose=1")
    args = parser.parse_args(argv)
    if args.cuda_memory_pool_mb is not None and args.cuda_memory_pool_mb < 0:
        parser.error(f"--cuda-memory-pool-mb must be >= 0, got {args.cuda_memory_pool_mb}")
    for arg in args.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            parser.error(f"{flag} after -- is set by this launcher: use {OWN_FLAGS[flag]} instead")
    return args


def server_args(extra_args: list[str]) -> list[str]:
    """The tritonserver arguments given, after the recoverable model control unless they
    choose a mode themselves."""
    if any(arg.startswith("--model-control-mode") for arg in extra_args):
        return list(extra_args)
    return [*RECOVERABLE_ARGS, *extra_args]


def banner(server: TritonServer) -> str:
    """Where the server listens, as tritonserver was told."""
    where = "every interface, " if server.host in ANY_HOST else ""
    return (f"HTTP    {server.host}:{server.http_port}\ngRPC    {server.host}:{server.grpc_port}\n"
            f"metrics http://{server.host}:{server.metrics_port}/metrics\n"
            + (f"        ({where}{server.connect_host} from this machine)\n" if where else "")
            + f"log     {server.log_file}")


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise SystemExit(f"{name}={value!r}; expected a port number")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM is handled like Ctrl-C so both reach the `finally` below, which
    # stops the server in order (SIGTERM to it, wait for its stubs). The server
    # runs in its own session, so a terminal's Ctrl-C does not hit it directly.
    # SIGINT is set explicitly: a shell's background job starts with it ignored.
    try:
        deployment.check_components(args.model_repository, args.components)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    server = TritonServer(
        model_repository=args.model_repository, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_file=args.log_file,
        extra_args=server_args(args.extra_args), workdir=args.workdir, startup_timeout=args.startup_timeout,
        cuda_memory_pool_mb=args.cuda_memory_pool_mb, host=args.host)
    try:
        server.start()
        print(banner(server), flush=True)
        while server.is_running():
            time.sleep(0.5)
        print(f"tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver", file=sys.stderr)
        return 0
    except ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
