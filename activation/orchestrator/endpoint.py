"""Where a spool's orchestrator answers: ``orchestrator/api.json`` under the spool root.

The orchestrator writes it once its admin API is bound and removes it when it stops. The CLI
reads it to send ``activation dispatch`` through the orchestrator of *its own* spool (one
dispatch path: the same decision, the same metrics), never through whatever answers a default
port. A file left by a crash only costs the CLI a refused connection, after which it dispatches
itself.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool

ENDPOINT_FILE = Path("orchestrator") / "api.json"
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def reachable_url(host: str, port: int) -> str:
    """The API's URL for a bind address; a wildcard bind is reached over loopback."""
    host = WILDCARDS.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_endpoint(spool: Spool, host: str, port: int) -> None:
    path = spool.root / ENDPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"url": reachable_url(host, port), "pid": os.getpid()})


def clear_endpoint(spool: Spool) -> None:
    with contextlib.suppress(OSError):
        (spool.root / ENDPOINT_FILE).unlink()


def read_endpoint(spool: Spool) -> str | None:
    """The URL of the orchestrator that last served this spool, or None."""
    try:
        data = read_json(spool.root / ENDPOINT_FILE)
    except (OSError, ValueError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) and url.startswith("http") else None
