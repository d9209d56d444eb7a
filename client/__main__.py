"""Generate one image with the ``asyncdiff`` model on a running Triton server.

    python -m client "a handwritten digit 7" --out digit.png
    python -m client "a handwritten digit 7" --protocol http --seed 3 --steps 25 --scheduler euler
    python -m client "a handwritten digit 3" --num-images 4 --out digits.png   # digits.0.png ...
    python -m client "a handwritten digit 3" --init-image digit.png --strength 0.6

Over gRPC the request is streamed (``asyncdiff_stream``) and a progress bar shows
each step; ``--no-stream`` (or HTTP) calls the unary ``asyncdiff`` model instead.
Options left out are not sent: the model's own defaults apply. Sizes are pixels.
The client first reads what the deployment serves (its model configs): ``--init-image``
is sent at its own size when that is served, else resized (Lanczos) to the served size
closest to its aspect ratio, or to ``--width``/``--height``; a deployment without img2img
(SD3, FLUX) and an image count or size it does not serve are refused before sending.
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

from asyncdiff.contract import INPUT_BY_FIELD, add_request_arguments
from client.connection import problem
from client.deployment import Deployment, choose_size, fit_image, read_deployment, resize_note
from client.infer import (PROTOCOLS, GenerationParams, auto_upscale_factor, default_url, generate,
                          generate_stream, upscale)

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


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
    # Options that would be sent and then do nothing: refused, not ignored.
    if args.strength is not None and args.init_image is None:
        p.error(f"--strength ({INPUT_BY_FIELD['strength'].name}) applies to img2img only: "
                "give --init-image too")
    if args.preview_every and (args.protocol != "grpc" or args.no_stream):
        p.error("--preview-every needs the gRPC stream: drop "
                + ("--protocol http" if args.protocol != "grpc" else "--no-stream"))
    args.url = args.url or default_url(args.protocol)
    return args


def params_from_args(args: argparse.Namespace, deployment: Deployment | None = None,
                     init_image: np.ndarray | None = None) -> GenerationParams:
    """The request, checked against ``deployment`` when known (ValueError names the input);
    ``init_image`` at a size the deployment serves."""
    values = {f.name: getattr(args, f.name) for f in fields(GenerationParams) if hasattr(args, f.name)}
    if init_image is not None:
        served = deployment.sizes() if deployment else []
        values["width"], values["height"] = choose_size(
            (init_image.shape[1], init_image.shape[0]), served, args.width, args.height)
    if deployment is not None:
        deployment.check(values.get("num_images"), values.get("width"), values.get("height"),
                         init_image is not None)
    if init_image is not None:
        width, height = values["width"], values["height"]
        if (width, height) != (init_image.shape[1], init_image.shape[0]):
            print(f"note: {resize_note(str(args.init_image), init_image, width, height)}",
                  file=sys.stderr)
        values["init_image"] = fit_image(init_image, width, height)
    return GenerationParams(**values)


def load_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; ValueError says why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file Pillow can read") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


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
    """``factor`` 0: ``auto_upscale_factor``."""
    from PIL import Image

    image = upscale(image, factor or auto_upscale_factor(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)


def _streamed(args: argparse.Namespace, params: GenerationParams):
    """A real progress bar (step i/T, rate, ETA) from the stream's per-step responses."""
    from tqdm import tqdm

    with tqdm(desc=f"asyncdiff at {args.url}", unit="step", file=sys.stderr) as bar:
        def on_step(done: int, total: int, preview: np.ndarray | None) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if preview is not None:
                save_png(preview, args.out.with_name(f"{args.out.stem}.step{done}.png"), args.upscale)

        result = generate_stream(params, url=args.url, timeout=args.timeout,
                                 on_step=on_step, preview_every=args.preview_every)
        bar.update(bar.total - bar.n if bar.total else 0)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:  # a stream in flight was cancelled on the way out
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from tritonclient.utils import InferenceServerException

    start = time.monotonic()
    try:  # the local file first: its mistakes are not the server's
        init_image = load_image(args.init_image) if args.init_image is not None else None
    except ValueError as exc:
        return _error(f"--init-image {exc}")
    try:
        deployment = read_deployment(args.protocol, args.url, timeout=min(args.timeout, 30.0))
        params = params_from_args(args, deployment, init_image)
        if args.protocol == "grpc" and not args.no_stream:
            result = _streamed(args, params)
        else:
            with Spinner(f"asyncdiff via {args.protocol} at {args.url}"):
                result = generate(params, protocol=args.protocol, url=args.url, timeout=args.timeout)
    except ValueError as exc:  # the deployment does not serve what was asked
        return _error(str(exc))
    except Exception as exc:  # tritonclient's, socket and HTTP-parser errors
        cause = problem(exc, args.url, args.protocol)
        if cause is None and not isinstance(exc, InferenceServerException):
            raise
        return _error(cause or exc.message() or str(exc))
    elapsed = time.monotonic() - start
    paths = image_paths(args.out, len(result.images))
    factor = args.upscale or auto_upscale_factor(result.image)
    for image, path in zip(result.images, paths):
        save_png(image, path, factor)
    if args.latents:
        np.save(args.latents, result.latents)
    print(f"{', '.join(map(str, paths))} ({saved_what(result.image, len(paths), factor)}) "
          f"in {elapsed:.2f} s")
    return 0


def saved_what(image: np.ndarray, count: int, factor: int) -> str:
    """What the PNGs hold: their size, and the model's when they were upscaled."""
    h, w = image.shape[:2]
    pngs = f"{w * factor}x{h * factor} PNG" if count == 1 else f"{count} PNGs, {w * factor}x{h * factor}"
    if factor == 1:
        return pngs
    return f"{pngs}: {w}x{h} upscaled {factor}x, --upscale 1 keeps it"


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
