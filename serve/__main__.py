"""Run tritonserver on a model repository until Ctrl-C or SIGTERM.

    python -m serve --model-repository model_repository [--http-port 8000]
                    [--cuda-memory-pool-mb MB] [-- --log-verbose=1]

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

from serve.launcher import DEFAULT_WORKDIR, RECOVERABLE_ARGS, ServerError, TritonServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
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
    return args


def server_args(extra_args: list[str]) -> list[str]:
    """The tritonserver arguments given, after the recoverable model control unless they
    choose a mode themselves."""
    if any(arg.startswith("--model-control-mode") for arg in extra_args):
        return list(extra_args)
    return [*RECOVERABLE_ARGS, *extra_args]


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
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    server = TritonServer(
        model_repository=args.model_repository, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_file=args.log_file,
        extra_args=server_args(args.extra_args), workdir=args.workdir, startup_timeout=args.startup_timeout,
        cuda_memory_pool_mb=args.cuda_memory_pool_mb)
    try:
        server.start()
        print(f"HTTP    {server.http_url}\ngRPC    {server.grpc_url}\n"
              f"metrics {server.metrics_url}\nlog     {server.log_file}", flush=True)
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
