"""Options and helpers shared by the commands that load a pair of models (ask, bench, eval).

Each option is an ``Annotated`` alias naming its flag, so a command declares
``ctx: Ctx = 4096`` and every command spells, documents and defaults it alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from vlmduo.engine import EngineSettings
from vlmduo.pipeline import AskOptions

if TYPE_CHECKING:
    from vlmduo.agents import Agent

# The models: a registry pair fills in whichever of --small / --large is not given.
SmallModel = Annotated[
    str | None, typer.Option("--small", help="Small (reasoning) model: registry name or .gguf path.")
]
LargeModel = Annotated[
    str | None, typer.Option("--large", help="Large (answering) model: registry name or .gguf path.")
]
SmallMmproj = Annotated[
    str | None, typer.Option("--small-mmproj", help="Projector for a --small .gguf path.")
]
LargeMmproj = Annotated[
    str | None, typer.Option("--large-mmproj", help="Projector for a --large .gguf path.")
]
Pair = Annotated[
    str, typer.Option("--pair", help="Registry pair supplying the models not given.", envvar="VLMDUO_PAIR")
]

# Token budgets of one ask.
ThinkBudget = Annotated[int, typer.Option("--think-budget", help="Cap on reasoning tokens.")]
MaxAnswerTokens = Annotated[int, typer.Option("--max-answer-tokens", help="Cap on answer tokens.")]
TransferBudget = Annotated[
    int, typer.Option("--transfer-budget", help="Cap on transferred reasoning tokens.")
]

# The engine.
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all cores).")]
NGpuLayers = Annotated[int, typer.Option("--n-gpu-layers", help="Layers to offload to the GPU (-1: all).")]
Ctx = Annotated[int, typer.Option("--ctx", help="Context size in tokens.")]
ImageMaxTokens = Annotated[
    int | None,
    typer.Option(
        "--image-max-tokens",
        help="Most tokens one image may become (dynamic-resolution models such as Qwen-VL; "
        "default: what --ctx leaves after the budgets).",
    ),
]
ImageMinTokens = Annotated[
    int | None,
    typer.Option("--image-min-tokens", help="Fewest tokens one image becomes (default: the model's)."),
]
Verbose = Annotated[bool, typer.Option("--verbose/--no-verbose", help="Show llama.cpp's own log lines.")]

# Network and output.
Offline = Annotated[
    bool, typer.Option("--offline/--no-offline", help="Never touch the network (also HF_HUB_OFFLINE=1).")
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def engine_settings(
    options: AskOptions,
    *,
    ctx: int,
    threads: int | None,
    n_gpu_layers: int,
    verbose: bool,
    image_max_tokens: int | None,
    image_min_tokens: int | None,
) -> EngineSettings:
    """Engine settings of a command that asks questions; the image cap derived from --ctx."""
    if image_max_tokens is None:
        image_max_tokens = options.image_token_budget(ctx)
    return EngineSettings(
        n_ctx=ctx,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        verbose=verbose,
        image_max_tokens=image_max_tokens,
        image_min_tokens=-1 if image_min_tokens is None else image_min_tokens,
    )


def pair_defaults(pair: str, small: str | None, large: str | None) -> tuple[str, str]:
    """``--small`` and ``--large``, the registry pair ``pair`` filling in the ones not given."""
    if small is not None and large is not None:
        return small, large
    from vlmduo import registry

    chosen = registry.load_registry().pair(pair)
    return small or chosen.small, large or chosen.large


def model_refs(
    pair: str,
    small: str | None,
    large: str | None,
    small_mmproj: str | None,
    large_mmproj: str | None,
) -> dict[str, tuple[str, str | None]]:
    """``{"small": (model, mmproj), "large": (model, mmproj)}`` from the model options."""
    small_ref, large_ref = pair_defaults(pair, small, large)
    return {"small": (small_ref, small_mmproj), "large": (large_ref, large_mmproj)}


def is_offline(flag: bool) -> bool:
    """``--offline``, or offline by the environment as the downloader reads it."""
    from vlmduo.hub import offline_mode

    return offline_mode(flag)


def name_list(text: str) -> list[str]:
    """Parse ``"small,duo"`` into names, dropping blanks."""
    return [part.strip() for part in text.split(",") if part.strip()]


def load_agents(
    roles: Sequence[str],
    refs: dict[str, tuple[str, str | None]],
    settings: EngineSettings,
    *,
    offline: bool,
    console: Console,
) -> dict[str, Agent]:
    """Resolve and load the agents of ``roles`` (small, large), once each, at once."""
    from vlmduo import api

    resolved = {role: api.resolve(*refs[role], offline=offline) for role in roles}
    with console.status("Loading models…"):
        agents, _ = api.load_agents(resolved, settings)
    return agents
