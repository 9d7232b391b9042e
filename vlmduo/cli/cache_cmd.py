"""``vlmduo cache``: the image prefixes kept on disk, per model, and clearing them."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary
from vlmduo.cli.render import Column, fitted_tables, fmt_bytes, print_tables, stderr_console

CACHE_HELP = """Show (or --clear) the image prefixes vlmduo keeps on disk.

`vlmduo ask` keeps each model's state up to and including an image (its KV cache, \
llama.cpp's sequence state) so that the next question about the same image, from \
any later process, costs only the question's tokens. The folder is private to you \
(0700), bounded (VLMDUO_IMAGE_CACHE_SIZE, default 4G, least recently used out) and \
never trusted blindly: a file that is corrupt or not for the model, projector, \
image and settings asked about is ignored and rebuilt. --no-image-cache on \
`vlmduo ask` turns it off for one ask.

[bold]Examples[/]

  vlmduo cache

  vlmduo cache --json

  vlmduo cache --clear
"""


def cache(
    clear: Annotated[bool, typer.Option("--clear", help="Remove every kept image prefix.")] = False,
    json_out: opt.JsonOut = False,
) -> None:
    from vlmduo import paths
    from vlmduo.engine.prefix_cache import DiskPrefixes

    store = DiskPrefixes(paths.kv_dir(), opt.image_cache_disk_bytes())
    if clear:
        freed = store.clear()
        if json_out:
            print(json.dumps({"folder": str(store.folder), "freed_bytes": freed}))
        else:
            stderr_console().print(f"Cleared {fmt_bytes(freed)} of image prefixes from {store.folder}")
        return
    models: dict[str, dict[str, int]] = {}
    for _, st, meta in store.entries():
        row = models.setdefault(str(meta.get("model") or "?"), {"images": 0, "bytes": 0})
        row["images"] += 1
        row["bytes"] += st.st_size
    total = sum(row["bytes"] for row in models.values())
    if json_out:
        body = {"folder": str(store.folder), "max_bytes": store.max_bytes, "bytes": total, "models": models}
        print(json.dumps(body, ensure_ascii=False))
        return
    console = Console(highlight=False)
    head = f"Image prefixes in {store.folder}: {fmt_bytes(total)} (at most {fmt_bytes(store.max_bytes)})"
    if not models:
        console.print(f"{head}; none kept yet")
        return
    console.print(head)
    columns = [Column("MODEL", wrap=True, min_width=12), Column("IMAGES", justify="right"), Column("SIZE")]
    rows = [[name, str(row["images"]), fmt_bytes(row["bytes"])] for name, row in sorted(models.items())]
    print_tables(console, fitted_tables(None, columns, rows, width=console.width))


def register(app: typer.Typer) -> None:
    """Add ``cache`` to the app."""
    app.command("cache", help=CACHE_HELP)(boundary(cache))
