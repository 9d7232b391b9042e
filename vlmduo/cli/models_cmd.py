"""``vlmduo models``, ``vlmduo pull`` and ``vlmduo rm``: parse, call the core, render."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vlmduo.cli.errors import boundary
from vlmduo.cli.render import stderr_console

MODELS_HELP = """List the models and pairs of the registry and what is downloaded.

The registry is the shipped models.toml plus your own $VLMDUO_HOME/models.toml \
(default ~/.config/vlmduo/models.toml), which adds or replaces entries by name. \
"Downloaded" is read from the Hugging Face cache (HF_HOME), never from the network.

[bold]Examples[/]

  vlmduo models

  vlmduo models --json | jq '.models[] | select(.downloaded) | .name'
"""

PULL_HELP = """Download models (model file and projector) into the Hugging Face cache.

Honours HF_HOME, HF_ENDPOINT and HF_TOKEN. An interrupted download resumes on the \
next pull; files already in the cache are not fetched again.

[bold]Examples[/]

  vlmduo pull --pair default

  vlmduo pull qwen3-vl-2b-thinking qwen3-vl-8b-instruct

  HF_TOKEN=hf_... vlmduo pull gemma-3-4b
"""

RM_HELP = """Delete a model's files from the Hugging Face cache.

Files shared with another registry entry are kept; local-file entries are never \
deleted. Synthetic models are removed from their build cache.

[bold]Examples[/]

  vlmduo rm qwen3-vl-8b-instruct
"""


def _stdout() -> Console:
    # Pipes get a wide table rather than rich's default 80 columns, so names never wrap.
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _bytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"


def _approx_gb(size_gb: float | None) -> str:
    return "" if size_gb is None else f"~{size_gb:g} GB"


def models(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")
    ] = False,
) -> None:
    """List the registry with download state."""
    from vlmduo import hub
    from vlmduo.registry import load_registry

    registry = load_registry()
    rows = [_model_row(entry, hub.entry_status(entry)) for entry in registry.models.values()]
    downloaded = {row["name"]: row["downloaded"] for row in rows}
    pairs = [
        {
            "name": pair.name,
            "small": pair.small,
            "large": pair.large,
            "notes": pair.notes,
            "downloaded": downloaded[pair.small] and downloaded[pair.large],
        }
        for pair in registry.pairs.values()
    ]
    if json_out:
        document = {
            "models": rows,
            "pairs": pairs,
            "cache_dir": str(hub.hub_cache_dir()),
            "registry_files": [str(path) for path in registry.files],
        }
        print(json.dumps(document, ensure_ascii=False))
        return
    console = _stdout()
    console.print(_models_table(rows))
    console.print()
    console.print(_pairs_table(pairs))


def _model_row(entry: Any, status: Any) -> dict[str, Any]:
    return {
        "name": entry.name,
        "source": entry.source,
        "role": entry.role,
        "thinking": entry.thinking,
        "family": entry.family,
        "repo": entry.repo,
        "file": entry.file,
        "mmproj": entry.mmproj,
        "revision": entry.revision,
        "path": str(entry.path) if entry.path else None,
        "mmproj_path": str(entry.mmproj_path) if entry.mmproj_path else None,
        "size_gb": entry.size_gb,
        "memory_gb": entry.memory_gb,
        "verified": entry.verified,
        "downloaded": status.downloaded,
        "size_on_disk": status.size_bytes,
        "files": [str(p) for p in (status.model_path, status.mmproj_path) if p is not None],
        "origin": str(entry.origin) if entry.origin else None,
    }


def _models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Models", title_justify="left", box=None, pad_edge=False)
    for column in ("name", "source", "role", "thinking", "size", "memory", "downloaded", "verified"):
        table.add_column(column, justify="right" if column in ("size", "memory") else "left")
    for row in rows:
        on_disk = row["size_on_disk"]
        size = _bytes(on_disk) if row["downloaded"] else _approx_gb(row["size_gb"])
        state = "yes" if row["downloaded"] else ("partly" if on_disk else "no")
        table.add_row(
            row["name"],
            row["source"],
            row["role"],
            "yes" if row["thinking"] else "no",
            size,
            _approx_gb(row["memory_gb"]),
            f"[green]{state}[/]" if state == "yes" else state,
            ("yes" if row["verified"] else "no") if row["source"] == "hub" else "-",
        )
    return table


def _pairs_table(pairs: list[dict[str, Any]]) -> Table:
    table = Table(title="Pairs", title_justify="left", box=None, pad_edge=False)
    for column in ("pair", "small", "large", "downloaded", "notes"):
        table.add_column(column)
    for pair in pairs:
        state = "[green]yes[/]" if pair["downloaded"] else "no"
        table.add_row(pair["name"], pair["small"], pair["large"], state, pair["notes"] or "")
    return table


def pull(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Registry names to download.", metavar="NAME...", show_default=False),
    ] = None,
    pair: Annotated[
        str | None, typer.Option("--pair", help="Download both models of this registry pair.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars; only errors on stderr.")
    ] = False,
) -> None:
    """Download models into the Hugging Face cache."""
    from vlmduo import hub

    console = stderr_console(quiet=quiet)
    results = hub.pull(names or [], pair, progress=not quiet)
    for entry, model_path, mmproj_path in results:
        size = model_path.stat().st_size + mmproj_path.stat().st_size
        console.print(f"[green]✓[/] {entry.name} ({_bytes(size)}): {model_path.parent}")


def rm(
    name: Annotated[str, typer.Argument(help="Registry name whose files to delete.", metavar="NAME")],
) -> None:
    """Delete a model's files from the cache."""
    from vlmduo import hub
    from vlmduo.registry import load_registry

    registry = load_registry()
    entry = registry.model(name)
    had_files = any(hub.cached_files(entry))
    freed = hub.remove(entry, registry=registry)
    console = stderr_console()
    if freed:
        console.print(f"Removed {name}: freed {_bytes(freed)}.")
    elif had_files:
        console.print(f"Kept the files of {name}: another downloaded entry uses them.")
    else:
        console.print(f"{name} is not downloaded; nothing to remove.")


def register(app: typer.Typer) -> None:
    """Add ``models``, ``pull`` and ``rm`` to the app."""
    app.command("models", help=MODELS_HELP)(boundary(models))
    app.command("pull", help=PULL_HELP)(boundary(pull))
    app.command("rm", help=RM_HELP)(boundary(rm))
