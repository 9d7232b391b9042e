"""``vlmduo serve``, ``vlmduo ps`` and ``vlmduo stop``: parse, call ``vlmduo.serve``, render."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary
from vlmduo.cli.render import Column, fitted_tables, fmt_bytes, print_tables, stderr_console
from vlmduo.errors import UsageError

if TYPE_CHECKING:
    from vlmduo.serve.runtime import ServerRecord

SERVE_HELP = """Keep a pair of models loaded and answer over HTTP until stopped.

`vlmduo ask` with the same models then uses this server (no model load per call); \
so do OpenAI clients (base URL http://127.0.0.1:8491/v1, models PAIR:duo, \
PAIR:small, PAIR:large, PAIR:large-think) and POST /api/ask, which returns the \
`ask --json` object. Local only unless --host says otherwise (then --api-key is \
required). After --keep-alive without a request the models are unloaded; the next \
request loads them again. One server per pair: a second one for the same models \
refuses to start.

[bold]Examples[/]

  vlmduo serve --pair synthetic --detach     (returns once the models are loaded)

  for f in photos/*.jpg; do vlmduo ask "$f" "Is there a dog?"; done

  vlmduo ps

  vlmduo stop
"""

PS_HELP = """List the running vlmduo servers: pair, address, what is loaded and until when."""

STOP_HELP = """Stop running vlmduo servers: all of them, or those serving PAIR."""


def _short(ref: str) -> str:
    return Path(ref).stem if ref.endswith(".gguf") or "/" in ref else ref


def _pair_name(pair: str, small: str | None, large: str | None, refs: dict) -> str:
    """The pair's name in model ids: the registry pair's, or SMALL+LARGE when overridden."""
    if small is None and large is None:
        return pair
    return f"{_short(refs['small'][0])}+{_short(refs['large'][0])}"


def serve(
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    small_mmproj: opt.SmallMmproj = None,
    large_mmproj: opt.LargeMmproj = None,
    pair: opt.Pair = "default",
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (not loopback: --api-key is required).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port).")] = 8491,
    keep_alive: Annotated[
        str,
        typer.Option(
            "--keep-alive",
            help="Unload the models after this long without a request: 5m, 30s, 1h, 0, -1 (never).",
        ),
    ] = "5m",
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="Require 'Authorization: Bearer KEY'.", envvar="VLMDUO_API_KEY"),
    ] = None,
    allow_url_images: Annotated[
        bool,
        typer.Option(
            "--allow-url-images", help="Let requests name http(s) image URLs for the server to fetch."
        ),
    ] = False,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait while one runs (more get HTTP 429).")
    ] = 8,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body, MiB.")] = 32.0,
    max_image_mb: Annotated[float, typer.Option("--max-image-mb", help="Largest encoded image, MiB.")] = 20.0,
    cache_images: Annotated[
        str,
        typer.Option(
            "--cache-images",
            help="Memory for the models' state up to each image (a second question about an "
            "image costs only its own tokens), least recently used out: 1G, 512M, 0 (off).",
        ),
    ] = "1G",
    detach: Annotated[
        bool, typer.Option("--detach", help="Start in the background; return once the models are loaded.")
    ] = False,
    threads: opt.Threads = None,
    n_gpu_layers: opt.NGpuLayers = -1,
    ctx: opt.Ctx = 4096,
    image_max_tokens: opt.ImageMaxTokens = None,
    image_min_tokens: opt.ImageMinTokens = None,
    offline: opt.Offline = False,
    verbose: opt.Verbose = False,
    log_file: Annotated[str | None, typer.Option("--log-file", hidden=True)] = None,
) -> None:
    from vlmduo.cli import served
    from vlmduo.duo.pipeline import AskOptions
    from vlmduo.serve import runtime, server
    from vlmduo.serve.host import PairSpec
    from vlmduo.serve.wire import Limits

    keep_alive_s = runtime.parse_duration(keep_alive)
    cache_bytes = opt.parse_size(cache_images, "--cache-images")
    if max_queue < 0 or max_body_mb <= 0 or max_image_mb <= 0:
        raise UsageError(
            "--max-queue must not be negative; --max-body-mb and --max-image-mb must be positive"
        )
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number (0 to 65535)")
    server.check_exposure(host, api_key)
    refs = opt.model_refs(pair, small, large, small_mmproj, large_mmproj)
    # The image cap derived from --ctx as `vlmduo ask` derives it with its default budgets,
    # so a plain `vlmduo ask` matches this server's settings.
    settings = opt.engine_settings(
        AskOptions(),
        ctx=ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        verbose=verbose,
        image_max_tokens=image_max_tokens,
        image_min_tokens=image_min_tokens,
    )
    console = stderr_console()
    if detach:
        args = _child_args(
            small=small,
            large=large,
            small_mmproj=small_mmproj,
            large_mmproj=large_mmproj,
            pair=pair,
            host=host,
            port=port,
            keep_alive=keep_alive,
            allow_url_images=allow_url_images,
            max_queue=max_queue,
            max_body_mb=max_body_mb,
            max_image_mb=max_image_mb,
            cache_images=cache_images,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            ctx=ctx,
            image_max_tokens=image_max_tokens,
            image_min_tokens=image_min_tokens,
            offline=offline,
            verbose=verbose,
        )
        with console.status("Starting the server and loading the models…"):
            record = server.detach(args, runtime.pair_key(refs), api_key=api_key)
        console.print(
            f"vlmduo serves pair {record.pair} at {record.url} (pid {record.pid}); stop it: vlmduo stop"
        )
        print(record.url)
        return
    limits = Limits(
        max_body_bytes=int(max_body_mb * 2**20),
        max_image_bytes=int(max_image_mb * 2**20),
        allow_url_images=allow_url_images,
    )
    options = server.ServeOptions(
        spec=PairSpec(_pair_name(pair, small, large, refs), refs, settings, opt.is_offline(offline)),
        host=host,
        port=port,
        keep_alive_s=keep_alive_s,
        api_key=api_key,
        limits=limits,
        max_waiting=max_queue,
        verbose=verbose,
        log=log_file,
    )
    from vlmduo import api

    api.keep_image_prefixes(memory_bytes=cache_bytes)  # in memory only: this process lives on
    status = console.status("Loading models…")

    def loading(record: ServerRecord) -> None:
        console.print(f"Loading pair {record.pair} for {record.url} …")
        status.start()

    def ready(record: ServerRecord, load_ms: dict[str, float]) -> None:
        status.stop()
        loaded = ", ".join(f"{name} {ms / 1000:.1f} s" for name, ms in load_ms.items())
        console.print(
            f"vlmduo serves pair {record.pair} at {record.url} (OpenAI base URL {record.url}/v1)\n"
            f"  models: {' + '.join(record.models.values())} (loaded: {loaded or 'cached'})\n"
            f"  idle unload: {runtime.format_duration(keep_alive_s)} · queue: {max_queue} · "
            f"pid {record.pid} · stop: Ctrl-C or vlmduo stop"
        )

    try:
        server.serve(options, on_loading=loading, on_ready=ready, cli_runner=served.run_for_client)
    except SystemExit:  # SIGTERM (vlmduo stop)
        status.stop()
        console.print("Stopped.")
        raise
    finally:
        status.stop()
    console.print("Stopped.")  # a signal the shell had us ignore, handled by uvicorn alone


def _child_args(**values: Any) -> list[str]:
    """The command line of a detached ``vlmduo serve`` (the API key travels in the environment)."""
    args: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:  # every flag passed here is off by default
                args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


def _stdout() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _status(record: ServerRecord) -> dict[str, Any]:
    """A server's live status (its record's when it does not answer)."""
    from vlmduo.serve.client import Client, ServerGone

    row: dict[str, Any] = {
        "pair": record.pair,
        "url": record.url,
        "pid": record.pid,
        "models": record.models,
        "state": record.state,
        "keep_alive_s": record.keep_alive_s,
        "unload_at": None,
        "busy": False,
        "waiting": 0,
        "auth": record.auth,
        "log": record.log,
        "image_cache": None,
    }
    if record.state != "ready":
        return row
    try:
        with Client(record) as client:
            live = client.status()
    except ServerGone:
        row["state"] = "not answering"
        return row
    for key in ("state", "models", "unload_at", "busy", "waiting", "keep_alive_s", "image_cache"):
        row[key] = live.get(key, row[key])
    return row


def _until(row: dict[str, Any]) -> str:
    if row["state"] != "loaded":
        return ""
    if row["busy"] or row["waiting"]:
        return "busy"
    if row["keep_alive_s"] is None:
        return "forever"
    at = row["unload_at"]
    if at is None:
        return ""
    left = max(0, round(at - time.time()))
    return f"{datetime.fromtimestamp(at):%H:%M:%S} (in {left // 60}m{left % 60:02d}s)"


def _images(stats: dict[str, int] | None) -> str:
    """The server's kept image prefixes: how many, their size, and how often reused."""
    if not stats:
        return ""
    return f"{stats['entries']} ({fmt_bytes(stats['bytes'])}), {stats['hits']} reused"


def ps(json_out: opt.JsonOut = False) -> None:
    from vlmduo.serve import runtime

    rows = [_status(record) for record in runtime.live_records()]
    if json_out:
        print(json.dumps({"servers": rows}, ensure_ascii=False))
        return
    if not rows:
        stderr_console().print("No vlmduo server is running. Start one: vlmduo serve --detach")
        return
    # Fitted to the terminal: a URL or a command is never broken mid-value; a table too
    # wide is split in parts that repeat the pair.
    longest = max((len(name) for row in rows for name in (row["models"] or {}).values()), default=6)
    columns = [
        Column("PAIR"),
        Column("URL"),
        Column("PID", justify="right"),
        Column("STATE"),
        Column("MODELS", wrap=True, min_width=longest + 2),  # wraps between names, never in one
        Column("UNLOADS AT", wrap=True, min_width=8),
        Column("IMAGES", wrap=True, min_width=8),
    ]
    table_rows = [
        [
            row["pair"],
            row["url"],
            str(row["pid"]),
            row["state"],
            " + ".join(row["models"].values()) if row["models"] else "",
            _until(row),
            _images(row["image_cache"]),
        ]
        for row in rows
    ]
    console = _stdout()
    print_tables(console, fitted_tables(None, columns, table_rows, width=console.width))


def stop(
    pair: Annotated[str | None, typer.Argument(help="Stop only the server of this pair.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait before killing it.")] = 20.0,
) -> None:
    from vlmduo.serve import runtime

    console = stderr_console()
    records = [r for r in runtime.live_records() if pair is None or r.pair == pair]
    if not records:
        console.print("No vlmduo server is running" + (f" for pair {pair}." if pair else "."))
        return
    for record in records:
        how = _terminate(record, timeout)
        console.print(f"Stopped the server of pair {record.pair} at {record.url} (pid {record.pid}){how}.")


def _terminate(record: ServerRecord, timeout: float) -> str:
    """SIGTERM, then wait until the server removed its record (or exited); SIGKILL after ``timeout``."""
    from vlmduo.serve import runtime

    def gone() -> bool:
        current = runtime.read_record(runtime.record_path(record.key))
        return current is None or current.pid != record.pid or not runtime.pid_alive(record.pid)

    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            return ""
        time.sleep(0.05)
    try:
        os.kill(record.pid, signal.SIGKILL)
    except ProcessLookupError:
        return ""
    runtime.remove_record(record)
    return f", killed after {timeout:g} s"


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``ps`` and ``stop`` to the app."""
    app.command("serve", help=SERVE_HELP)(boundary(serve))
    app.command("ps", help=PS_HELP)(boundary(ps))
    app.command("stop", help=STOP_HELP)(boundary(stop))
