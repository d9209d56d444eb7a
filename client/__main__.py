"""Generate one image with the ``asyncdiff`` model on a running Triton server.

    python -m client "a handwritten digit 7" --out digit.png
    python -m client "a handwritten digit 7" --protocol http --seed 3 --steps 25 --scheduler euler
    python -m client "a handwritten digit 3" --num-images 4 --out digits.png   # digits.0.png ...
    python -m client "a handwritten digit 3" --init-image digit.png --strength 0.6

Over gRPC the request is streamed (``asyncdiff_stream``) and a progress bar shows
each step; ``--no-stream`` (or HTTP) calls the unary ``asyncdiff`` model instead.
Options left out are not sent: the model's own defaults apply. Sizes are pixels;
``--init-image`` sends its own size as HEIGHT/WIDTH unless they are given.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import TextIO

import numpy as np

from asyncdiff.contract import add_request_arguments
from client.infer import (PROTOCOLS, GenerationParams, auto_upscale_factor, default_url, generate,
                          generate_stream, upscale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--out", type=Path, default=Path("image.png"), help="PNG path (default: %(default)s)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    p.add_argument("--url", help="host:port (default: 127.0.0.1:$GRPC_PORT or 8001 for grpc, "
                                 "127.0.0.1:$HTTP_PORT or 8000 for http)")
    # Left out: not sent. Not range-checked here: the server's error names the allowed values.
    add_request_arguments(p, None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default: %(default)s)")
    p.add_argument("--upscale", type=int, default=0,
                   help="nearest-neighbour factor for the saved PNG; 0 (default) picks the "
                        "smallest factor giving >= 256 px, e.g. 16 for the tiny model's 16x16")
    p.add_argument("--latents", type=Path, help="also save the final latents (.npy)")
    p.add_argument("--init-image", type=Path,
                   help="img2img: start from this image (any format PIL reads; RGB; INIT_IMAGE)")
    p.add_argument("--no-stream", action="store_true",
                   help="gRPC: call the unary model (no progress bar)")
    p.add_argument("--preview-every", type=int, default=0,
                   help="streaming: save a preview PNG beside --out every k steps (default: none)")
    args = p.parse_args(argv)
    if args.upscale < 0:
        p.error("--upscale must be >= 0")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    args.url = args.url or default_url(args.protocol)
    return args


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    values = {f.name: getattr(args, f.name) for f in fields(GenerationParams) if hasattr(args, f.name)}
    if getattr(args, "init_image", None) is not None:
        image = load_image(args.init_image)
        values["init_image"] = image
        values["height"] = values.get("height") or image.shape[0]
        values["width"] = values.get("width") or image.shape[1]
    return GenerationParams(**values)


def load_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image; ``<stem>.<i><suffix>`` for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}.{i}{out.suffix}") for i in range(count)]


class Spinner:
    """Shows elapsed time on stderr while a blocking call runs.

    Redrawn in place on a terminal; in logs (not a tty) one line is written instead.
    """

    def __init__(self, label: str, stream: TextIO = sys.stderr, interval: float = 0.1) -> None:
        self.label, self.stream, self.interval = label, stream, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def __enter__(self) -> "Spinner":
        self._start = time.monotonic()
        if self.stream.isatty():
            self._thread.start()
        else:
            print(f"{self.label} ...", file=self.stream, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.stream.write("\r\033[K")  # clear the spinner line
            self.stream.flush()

    def _run(self) -> None:
        for frame in itertools.cycle("|/-\\"):
            if self._stop.wait(self.interval):
                return
            self.stream.write(f"\r{frame} {self.label} {time.monotonic() - self._start:5.1f} s")
            self.stream.flush()


def save_png(image: np.ndarray, path: Path, factor: int) -> None:
    from PIL import Image

    image = upscale(image, factor or auto_upscale_factor(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)


def _streamed(args: argparse.Namespace):
    """A real progress bar (step i/T, rate, ETA) from the stream's per-step responses."""
    from tqdm import tqdm

    with tqdm(desc=f"asyncdiff at {args.url}", unit="step", file=sys.stderr) as bar:
        def on_step(done: int, total: int, preview: np.ndarray | None) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if preview is not None:
                save_png(preview, args.out.with_name(f"{args.out.stem}.step{done}.png"), args.upscale)

        result = generate_stream(params_from_args(args), url=args.url, timeout=args.timeout,
                                 on_step=on_step, preview_every=args.preview_every)
        bar.update(bar.total - bar.n if bar.total else 0)
    return result


def main(argv: list[str] | None = None) -> int:
    from tritonclient.utils import InferenceServerException

    args = parse_args(argv)
    start = time.monotonic()
    try:
        if args.protocol == "grpc" and not args.no_stream:
            result = _streamed(args)
        else:
            with Spinner(f"asyncdiff via {args.protocol} at {args.url}"):
                result = generate(params_from_args(args), protocol=args.protocol, url=args.url,
                                  timeout=args.timeout)
    except InferenceServerException as exc:
        print(f"error: {exc.message() or exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # HTTP: refused or timed-out connections surface as socket errors
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - start
    paths = image_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths):
        save_png(image, path, args.upscale)
    if args.latents:
        np.save(args.latents, result.latents)
    h, w = result.image.shape[:2]
    what = f"{w}x{h} image" if len(paths) == 1 else f"{len(paths)} {w}x{h} images"
    print(f"{', '.join(map(str, paths))} ({what}) in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
