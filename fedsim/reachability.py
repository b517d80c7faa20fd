"""Whether a service the run needs (a Ray cluster, a tracking server) answers, checked up
front: clients of both retry for a minute or more before they fail with a traceback."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def host_and_port(address: str, default_port: int) -> tuple[str, int] | None:
    """`(host, port)` of `host:port`, `scheme://host[:port]` or a bare host; None when
    `address` names no host (or a port that is not a number)."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, port or default_port


def connect_problem(host: str, port: int, timeout_s: float = 3.0) -> str | None:
    """Why a TCP connection to `host:port` fails within `timeout_s` (None: it connects)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as err:
        return f"unknown host ({err.strerror})"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as err:
        return err.strerror or type(err).__name__
