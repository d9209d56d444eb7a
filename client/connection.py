"""One line that names the cause of a connection mistake: nothing listening, the other
protocol's port, a host that does not resolve.

tritonclient reports these as gRPC status text ("failed to connect to all addresses; ...
Failed parsing HTTP/2") or as socket and HTTP-parser exceptions; the user asked for an
image and should read which address to fix.
"""

from __future__ import annotations

import socket

# Triton's own defaults (tritonserver and `python -m serve`).
GRPC_PORT, HTTP_PORT = 8001, 8000


def wrong_protocol(exc: BaseException, protocol: str) -> bool:
    """Whether the other end answered, in another protocol than ``protocol``."""
    if protocol == "grpc":
        # An HTTP/1.1 server answers a gRPC client with text (Triton's closes the socket).
        text = _text(exc)
        return "HTTP/2" in text or "http1" in text.lower() or "Socket closed" in text
    return type(exc).__name__ == "HTTPParseError"  # geventhttpclient's, on an HTTP/2 answer


def problem(exc: BaseException, url: str, protocol: str) -> str | None:
    """Why ``url`` could not be used over ``protocol``, or None when ``exc`` is not a
    connection problem (e.g. the server refused the request itself)."""
    text = _text(exc)
    if wrong_protocol(exc, protocol):
        if protocol == "grpc":
            return (f"{url} does not speak gRPC: is it Triton's HTTP port? Triton's gRPC port "
                    f"is {GRPC_PORT} by default")
        return (f"{url} does not answer HTTP/1.1: is it Triton's gRPC port? Triton's HTTP "
                f"port is {HTTP_PORT} by default")
    if protocol == "grpc":
        if "errors resolving" in text or "DNS resolution failed" in text:
            return f"cannot resolve the host of {url}"
        if "failed to connect to all addresses" in text or "Connection refused" in text:
            return f"nothing answers gRPC at {url} (connection refused): is tritonserver running there?"
        if "Deadline Exceeded" in text and "connect" in text.lower():
            return f"no answer from {url} in time: is it a Triton gRPC port?"
        return None
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {url}"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing answers HTTP at {url} (connection refused): is tritonserver running there?"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer from {url} in time"
    if isinstance(exc, OSError):
        return f"cannot reach {url}: {exc}"
    return None


def _text(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else ""
    return f"{text or ''} {exc}"
