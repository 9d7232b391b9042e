"""Starting a server: the pair's lock, the socket, the models, then uvicorn.

The order is what makes ``vlmduo serve &`` safe in a shell loop: the lock first
(a second server for the pair fails at once), then the socket (the port is known
and in the record), then the record in state ``loading`` (an ``ask`` that starts
now waits for this server instead of loading the models itself), then the
models, then the record in state ``ready`` and requests are served.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmduo.errors import UsageError, VlmduoError
from vlmduo.serve import runtime
from vlmduo.serve.host import Loader, PairHost, PairSpec
from vlmduo.serve.wire import Limits

if TYPE_CHECKING:
    from vlmduo.serve.app import CliRunner


class ServerError(VlmduoError):
    """The server could not start (port taken, a detached server that failed, ...)."""


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``vlmduo serve`` was asked for."""

    spec: PairSpec
    host: str = "127.0.0.1"
    port: int = runtime.DEFAULT_PORT
    keep_alive_s: float | None = 300.0
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_waiting: int = 8
    verbose: bool = False
    log: str | None = None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to put the models on the network without a key."""
    if not is_loopback(host) and not api_key:
        raise UsageError(
            f"--host {host} makes the server reachable from other machines: it needs --api-key",
            hint="pass --api-key KEY (or set VLMDUO_API_KEY), or keep the default --host 127.0.0.1",
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServerError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="another program uses the port: pick one with --port N, or --port 0 for any free port",
        ) from exc
    sock.set_inheritable(False)
    return sock


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (``vlmduo stop``) ends the server like Ctrl-C, with exit code 0."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    options: ServeOptions,
    *,
    on_loading: Callable[[runtime.ServerRecord], None] | None = None,
    on_ready: Callable[[runtime.ServerRecord, dict[str, float]], None] | None = None,
    loader: Loader | None = None,
    cli_runner: CliRunner | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C; the record is removed and the lock dropped on the way out.

    ``cli_runner`` answers thin ``vlmduo ask`` clients (the command line hands it in)."""
    check_exposure(options.host, options.api_key)
    spec = options.spec
    key = runtime.pair_key(spec.refs)
    with _stop_on_sigterm(), runtime.pair_lock(key):
        sock = bind(options.host, options.port)
        record = runtime.ServerRecord(
            key=key,
            pid=os.getpid(),
            host=options.host,
            port=sock.getsockname()[1],
            pair=spec.name,
            refs=runtime.normalize_refs(spec.refs),
            models={},
            engine=runtime.engine_fields(spec.settings),
            auth=bool(options.api_key),
            limits=options.limits.to_json(),
            keep_alive_s=options.keep_alive_s,
            log=options.log,
            cli_token=secrets.token_urlsafe(24),
        )
        host = PairHost(
            spec, keep_alive_s=options.keep_alive_s, max_waiting=options.max_waiting, loader=loader
        )
        try:
            runtime.write_record(record)
            if on_loading:
                on_loading(record)
            load_ms = host.load()
            record.models = host.model_names()
            record.state = "ready"
            runtime.write_record(record)
            if on_ready:
                on_ready(record, load_ms)
            host.start_idle_watch()
            _run(options, host, record, sock, cli_runner)
        finally:
            host.close()
            runtime.remove_record(record)
            sock.close()


def _run(
    options: ServeOptions,
    host: PairHost,
    record: runtime.ServerRecord,
    sock: socket.socket,
    cli_runner: CliRunner | None,
) -> None:
    import uvicorn

    from vlmduo.serve.app import AppConfig, create_app

    config = AppConfig(
        limits=options.limits,
        engine=record.engine,
        api_key=options.api_key,
        url=record.url,
        record=record,
        cli_runner=cli_runner,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            host.cancel_all()  # asks in flight stop now, so the graceful shutdown is quick
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            create_app(host, config),
            log_level="info" if options.verbose else "warning",
            access_log=options.verbose,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    )
    server.run(sockets=[sock])


# -- detached start ------------------------------------------------------------
def detach(
    args: list[str], key: str, *, api_key: str | None = None, wait_s: float = 600.0
) -> runtime.ServerRecord:
    """Start ``vlmduo serve ARGS`` in the background and return its record once it serves.

    The server's output goes to ``<run dir>/<key>.log``. If a server for the pair
    runs already, its record is returned and nothing is started.
    """
    running = _running(key)
    if running is not None:
        return running
    folder = runtime.run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{key}.log"
    env = dict(os.environ)
    if api_key:
        env["VLMDUO_API_KEY"] = api_key  # not on the command line, where ps would show it
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "vlmduo", "serve", *args, "--log-file", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,  # not killed with the shell's job, nor by its Ctrl-C
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        record = runtime.read_record(runtime.record_path(key))
        if record is not None and record.pid == child.pid and record.state == "ready":
            return record
        if child.poll() is not None:
            # Two detached starts at once: the one that lost the lock defers to the winner.
            running = _running(key)
            if running is not None:
                return running
            raise ServerError(f"the server did not start: {_last_line(log)}", hint=f"its log: {log}")
        time.sleep(0.1)
    child.terminate()
    raise ServerError(f"the server did not get ready in {wait_s:g} s", hint=f"its log: {log}")


def _running(key: str) -> runtime.ServerRecord | None:
    record = runtime.read_record(runtime.record_path(key))
    if record is None or not runtime.pid_alive(record.pid):
        return None
    return runtime.wait_ready(record, runtime.DEFAULT_WAIT_S)


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("Error: ")
