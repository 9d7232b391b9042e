"""``vlmduo models``, ``vlmduo pull`` and ``vlmduo rm``: parse, call the core, render."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary
from vlmduo.cli.render import Column, fitted_tables, print_tables, stderr_console

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
    # The terminal's width, or 80 columns in a pipe (COLUMNS overrides both): the tables fit it.
    return Console(highlight=False, soft_wrap=False)


def _bytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"


def _approx_gb(size_gb: float | None) -> str:
    return "" if size_gb is None else f"~{size_gb:g} GB"


def models(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")
    ] = False,
    debug: opt.Debug = False,
) -> None:
    """List the registry with download state."""
    from vlmduo.models import hub
    from vlmduo.models.registry import load_registry

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
    print_tables(console, _models_tables(rows, console.width))
    console.print(Text(VERIFIED_NOTE, style="dim"))
    console.print()
    print_tables(console, _pairs_tables(pairs, console.width))


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


MODEL_COLUMNS = (
    Column("name"),
    Column("role"),
    Column("thinking"),
    Column("size", justify="right"),
    Column("memory", justify="right"),
    Column("downloaded"),
    Column("verified"),
    Column("files (Hub repo, model, projector)"),
)
VERIFIED_NOTE = (
    "verified: yes when the repo and both file names were seen exactly in published copies "
    "of the Hub's listings (not checked against the Hub itself); a 'no' may fail to download. "
    "Sizes with ~ are approximate until downloaded."
)


def _files(row: dict[str, Any]) -> str:
    if row["source"] == "hub":
        return "\n".join(str(part) for part in (row["repo"], row["file"], row["mmproj"]) if part)
    if row["source"] == "local":
        return "\n".join(part for part in (row["path"], row["mmproj_path"]) if part)
    return "built locally (random weights)"


def _models_tables(rows: list[dict[str, Any]], width: int) -> list[Table]:
    """One row per model; split in two tables (names repeated) where the files do not fit."""
    cells = []
    for row in rows:
        on_disk = row["size_on_disk"]
        size = _bytes(on_disk) if row["downloaded"] else _approx_gb(row["size_gb"])
        state = "yes" if row["downloaded"] else ("partly" if on_disk else "no")
        cells.append(
            [
                row["name"],
                row["role"],
                "yes" if row["thinking"] else "no",
                size,
                _approx_gb(row["memory_gb"]),
                Text(state, style="green" if state == "yes" else ""),
                ("yes" if row["verified"] else "no") if row["source"] == "hub" else "-",
                _files(row),
            ]
        )
    return fitted_tables("Models", MODEL_COLUMNS, cells, width=width)


PAIR_COLUMNS = (
    Column("pair"),
    Column("small"),
    Column("large"),
    Column("downloaded"),
    Column("notes", wrap=True, min_width=30),
)


def _pairs_tables(pairs: list[dict[str, Any]], width: int) -> list[Table]:
    cells = [
        [
            pair["name"],
            pair["small"],
            pair["large"],
            Text("yes", style="green") if pair["downloaded"] else "no",
            pair["notes"] or "",
        ]
        for pair in pairs
    ]
    return fitted_tables("Pairs", PAIR_COLUMNS, cells, width=width)


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
    debug: opt.Debug = False,
) -> None:
    """Download models into the Hugging Face cache."""
    from vlmduo.models import hub

    console = stderr_console(quiet=quiet)
    results = hub.pull(names or [], pair, progress=not quiet)
    for entry, model_path, mmproj_path in results:
        size = model_path.stat().st_size + mmproj_path.stat().st_size
        console.print(f"[green]✓[/] {entry.name} ({_bytes(size)}): {model_path.parent}")


def rm(
    name: Annotated[str, typer.Argument(help="Registry name whose files to delete.", metavar="NAME")],
    debug: opt.Debug = False,
) -> None:
    """Delete a model's files from the cache."""
    from vlmduo.models import hub
    from vlmduo.models.registry import load_registry

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
