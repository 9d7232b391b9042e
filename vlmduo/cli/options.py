"""Options and helpers shared by the commands that load a pair of models (ask, bench, eval).

Each option is an ``Annotated`` alias naming its flag, so a command declares
``ctx: Ctx = 4096`` and every command spells, documents and defaults it alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from vlmduo.cli import checks
from vlmduo.duo.pipeline import AskOptions
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import DownloadError, OfflineError, UsageError

if TYPE_CHECKING:
    from vlmduo.agents.local import Agent

# The models: a registry pair fills in whichever of --small / --large is not given.
SmallModel = Annotated[
    str | None,
    typer.Option("--small", help="Small (reasoning) model: registry name, .gguf path or server URL#MODEL."),
]
LargeModel = Annotated[
    str | None,
    typer.Option("--large", help="Large (answering) model: registry name, .gguf path or server URL#MODEL."),
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
Threads = Annotated[
    int | None, typer.Option("--threads", help="CPU threads, 1 or more (default: all cores).")
]
NGpuLayers = Annotated[int, typer.Option("--n-gpu-layers", help="Layers to offload to the GPU (-1: all).")]
Ctx = Annotated[
    int,
    typer.Option(
        "--ctx", help="Context size in tokens: 256 or more (llama.cpp rounds it up to a multiple of 256)."
    ),
]
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
# Flags have no --no-... form: help stays readable at 80 columns.
Verbose = Annotated[bool, typer.Option("--verbose", help="Show llama.cpp's own log lines.")]

# Network and output.
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network (also HF_HUB_OFFLINE=1).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def _debug(value: bool) -> None:
    if value:
        os.environ["VLMDUO_DEBUG"] = "1"


# Documented on each command; ``vlmduo.cli.app.main`` also takes it anywhere on the line.
Debug = Annotated[
    bool,
    typer.Option(
        "--debug",
        help="Show the Python traceback of an error (also VLMDUO_DEBUG=1).",
        callback=_debug,
        is_eager=True,
    ),
]


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
    """Engine settings of a command that asks questions; the image cap derived from --ctx.

    Raises UsageError for values llama.cpp cannot honour (checked before any work)."""
    checks.engine(ctx=ctx, threads=threads)
    checks.image_tokens(image_max_tokens=image_max_tokens, image_min_tokens=image_min_tokens)
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
    from vlmduo.models import registry

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
    from vlmduo.models.offline import offline_mode

    return offline_mode(flag)


def name_list(text: str) -> list[str]:
    """Parse ``"small,duo"`` into names, dropping blanks."""
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_roles(
    roles: Sequence[str],
    refs: dict[str, tuple[str, str | None]],
    *,
    offline: bool,
    progress: bool = True,
) -> dict:
    """Files for each role (downloading what is missing), every missing model named at once.

    Offline with registry models missing fails before anything else, naming them all;
    a failed download names them all too, with the ways to go on.
    """
    from vlmduo import api
    from vlmduo.models import readiness

    names = [refs[role][0] for role in roles]
    missing = readiness.missing_models(names)
    # `vlmduo pull --pair P` when both models of a registry pair are wanted, else the names.
    pair = readiness.pair_of(refs["small"][0], refs["large"][0]) if len(roles) == 2 else None
    if missing and offline:
        listed = " and ".join(f"'{m.name}'" for m in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise OfflineError(
            f"{listed} {verb} not downloaded and offline mode is on",
            hint=readiness.ways_to_go_on(missing, pair, offline=True, roles=tuple(roles)),
        )
    try:
        if missing and not offline:
            # All at once: every file's size and existence is asked of the Hub before the
            # first byte comes, so a missing file or a full disk fails before any download.
            from vlmduo.models import hub

            hub.pull([m.name for m in missing], progress=progress)
        return {role: api.resolve(*refs[role], offline=offline, progress=progress) for role in roles}
    except DownloadError as exc:
        # The hub's hint says how to retry; add what is still missing and the other ways.
        still = readiness.missing_models(names)
        if still:
            listed = " and ".join(m.name for m in still)
            ways = readiness.ways_to_go_on(still, pair, offline=False, download=False, roles=tuple(roles))
            exc.hint = "; ".join(part for part in (exc.hint, f"still missing: {listed}", ways) if part)
        raise


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

    checks.engine(ctx=settings.n_ctx, threads=settings.n_threads)
    resolved = resolve_roles(roles, refs, offline=offline)
    with console.status("Loading models…"):
        agents, _ = api.load_agents(resolved, settings)
    return agents


_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, what: str) -> int:
    """A size as people write it: ``4G``, ``512M``, ``1.5GB``, ``800MiB``, ``0``; bytes
    when no unit (binary units: 1G is 2**30 bytes)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (value[:-1], value[-1]) if value[-1:] in "KMGT" and value[-1:] else (value, "")
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        size = -1.0
    if not size >= 0 or size == float("inf"):
        raise UsageError(
            f"cannot read the size {text!r} for {what}", hint="write it as 4G, 512M, 800MiB or 0"
        )
    return int(size)


IMAGE_CACHE_SIZE_ENV = "VLMDUO_IMAGE_CACHE_SIZE"


def image_cache_disk_bytes() -> int:
    """The bound of the image prefixes on disk: ``$VLMDUO_IMAGE_CACHE_SIZE`` (4G unset)."""
    from vlmduo.engine.prefix_cache import DEFAULT_DISK_BYTES

    value = os.environ.get(IMAGE_CACHE_SIZE_ENV, "").strip()
    return parse_size(value, IMAGE_CACHE_SIZE_ENV) if value else DEFAULT_DISK_BYTES
