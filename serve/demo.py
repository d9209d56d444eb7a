"""``make demo``: start tritonserver on a repository, generate one image through the client, stop.

    python -m serve.demo --model-repository model_repository --prompt "a handwritten digit 7" --out digit.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from client.__main__ import main as client_main
from serve import deployment
from serve.__main__ import _env_port
from serve.launcher import ServerError, TritonServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--prompt", default="a handwritten digit 7")
    p.add_argument("--out", default="digit.png")
    p.add_argument("--seed", type=int, help="default: the model's")
    p.add_argument("--steps", type=int, help="default: the model's")
    p.add_argument("--components", type=int, metavar="N",
                   help="refuse unless the repository is an N-component export")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        deployment.check_components(args.model_repository, args.components)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    server = TritonServer(args.model_repository, http_port=_env_port("HTTP_PORT", 8000),
                          grpc_port=_env_port("GRPC_PORT", 8001),
                          metrics_port=_env_port("METRICS_PORT", 8002))
    try:
        server.start()
        print(f"tritonserver ready in {time.perf_counter() - started:.1f} s "
              f"(HTTP {server.http_url}, gRPC {server.grpc_url})", flush=True)
        given = [(flag, value) for flag, value in (("--seed", args.seed), ("--steps", args.steps))
                 if value is not None]
        return client_main([args.prompt, "--url", server.grpc_url, "--out", args.out,
                            *(str(x) for pair in given for x in pair)])
    except ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        server.stop()
        print("tritonserver stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
