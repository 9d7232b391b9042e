"""Find and run llama.cpp's ``llama-server`` for the remote-agent tests.

The binary is built from the llama.cpp vendored in the installed
llama-cpp-python's sdist by ``scripts/build_llama_server.sh``, into
``~/.cache/vlmduo/llama-server-VERSION/bin/`` (or ``$LLAMA_SERVER_CACHE``);
``$LLAMA_SERVER_BIN`` names another binary. Without one, the tests that need it
skip, unless ``VLMDUO_BUILD_LLAMA_SERVER=1`` (CI sets it): then the script builds it
first, once per machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx

BUILD_HINT = "build it once with: bash scripts/build_llama_server.sh, or set LLAMA_SERVER_BIN"


def find_binary() -> Path | None:
    """``$LLAMA_SERVER_BIN``, else the build script's cache for this llama-cpp-python version."""
    named = os.environ.get("LLAMA_SERVER_BIN")
    if named:
        return Path(named) if Path(named).is_file() else None
    version = metadata.version("llama-cpp-python")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    cache = Path(os.environ.get("LLAMA_SERVER_CACHE") or Path(base) / "vlmduo" / f"llama-server-{version}")
    binary = cache / "bin" / "llama-server"
    if (
        not (binary.is_file() and os.access(binary, os.X_OK))
        and os.environ.get("VLMDUO_BUILD_LLAMA_SERVER") == "1"
    ):
        script = Path(__file__).resolve().parent.parent / "scripts" / "build_llama_server.sh"
        env = {**os.environ, "PYTHON": sys.executable, "LLAMA_SERVER_CACHE": str(cache)}
        subprocess.run(["bash", str(script)], env=env, check=True, stdout=subprocess.DEVNULL)
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One llama-server process on 127.0.0.1 and a free port, serving a model and its projector."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        mmproj: Path,
        *,
        alias: str,
        log_path: Path,
        api_key: str | None = None,
        ctx: int = 4096,
        slots: int = 1,
    ) -> None:
        self.port = free_port()
        self.alias = alias
        self.log_path = log_path
        self.args = [
            str(binary),
            "-m", str(model),
            "--mmproj", str(mmproj),
            "--alias", alias,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "-c", str(ctx),
            "-np", str(slots),
            "-t", "2",
            "--no-webui",
        ]  # fmt: skip
        if api_key:
            self.args += ["--api-key", api_key]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def start(self, timeout: float = 120.0) -> LlamaServer:
        """Start it and wait until ``/health`` answers 200."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if httpx.get(f"{self.root}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy: {self.log_tail()}")

    def stop(self) -> None:
        """Terminate it (kill after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Kill it at once, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def busy(self) -> bool:
        """True while a slot is processing a request."""
        slots = httpx.get(f"{self.root}/slots", timeout=5.0).json()
        return any(slot.get("is_processing") for slot in slots)

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
