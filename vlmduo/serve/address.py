"""Where servers are reached: their URLs (their run directory is ``vlmduo.paths.run_dir``).

Standard library only: the thin ``vlmduo ask`` client (``vlmduo.cli.thin_client``)
uses these as ``vlmduo.serve.runtime`` does, without runtime's imports.
"""

from __future__ import annotations


def connect_to(host: str, port: int) -> tuple[str, int]:
    """The address to connect to a server listening on ``host:port``: one listening on
    every interface is reached on loopback."""
    host = host.strip("[]")
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), int(port)


def url(host: str, port: int) -> str:
    """Base URL of the server listening on ``host:port``."""
    host, port = connect_to(host, port)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
