"""vlmduo's own folders on disk: its cache and, inside it, where servers are recorded.

Standard library only, read from the environment on every call (a long-lived process
and the tests see the current values). Every layer may use it.
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    """vlmduo's cache: ``$VLMDUO_CACHE``, else ``$XDG_CACHE_HOME/vlmduo`` or ``~/.cache/vlmduo``."""
    return os.environ.get("VLMDUO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmduo"
    )


def kv_dir() -> str:
    """Where image prefixes (KV states) are kept across processes: ``<cache>/kv``."""
    return os.path.join(cache_dir(), "kv")


def run_dir() -> str:
    """Where server records and locks live: ``<cache>/run``."""
    return os.path.join(cache_dir(), "run")
