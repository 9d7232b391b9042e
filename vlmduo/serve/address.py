"""Where servers are found and reached: their run directory and their URLs.

Standard library only: the thin ``vlmduo ask`` client (``vlmduo.cli.thin_client``)
uses these as ``vlmduo.serve.runtime`` does, without runtime's imports.
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    """vlmduo's cache: ``$VLMDUO_CACHE``, else ``$XDG_CACHE_HOME/vlmduo`` or ``~/.cache/vlmduo``."""
    return os.environ.get("VLMDUO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmduo"
    )


def run_dir() -> str:
    """Where server records and locks live: ``<cache>/run``."""
    return os.path.join(cache_dir(), "run")


def connect_to(host: str, port: int) -> tuple[str, int]:
    """The address to connect to a server listening on ``host:port``: one listening on
    every interface is reached on loopback."""
    host = host.strip("[]")
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), int(port)


def url(host: str, port: int) -> str:
    """Base URL of the server listening on ``host:port``."""
    host, port = connect_to(host, port)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
