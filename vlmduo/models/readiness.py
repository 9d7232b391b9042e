"""Is a pair ready to answer? Its files on disk, the Hub's answer, and what to run next.

Used by ``vlmduo doctor`` and by ``vlmduo ask`` when a model is missing: one place
that knows the ways to go on (download, the synthetic pair, one's own files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmduo.models.offline import offline_mode

EXAMPLE_QUESTION = "How many red circles are there?"
HUB_TIMEOUT_S = 3.0


@dataclass
class ModelReadiness:
    """One model of a pair: on disk or not, and what the Hub says of its files."""

    name: str
    role: str
    source: str
    downloaded: bool
    size_gb: float | None
    hub: str | None = None  # "found", "not found: ...", or None when not asked

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PairReadiness:
    """Whether a pair can answer now, whether the Hub can be reached, and what to run next."""

    pair: str
    models: list[ModelReadiness]
    endpoint: str
    hub: str  # "reachable", "unreachable: ...", "not checked: ...", "not needed"
    next_steps: list[dict[str, str]]  # {"command": ..., "note": ...}, the first to run first

    @property
    def ready(self) -> bool:
        """True when every model of the pair is on disk (or is built locally)."""
        return all(m.downloaded or m.source == "synthetic" for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {
            "pair": self.pair,
            "ready": self.ready,
            "models": [m.to_json() for m in self.models],
            "endpoint": self.endpoint,
            "hub": self.hub,
            "next": self.next_steps,
        }


def ask_command(pair: str) -> str:
    """The first question to ask, on the picture shipped with vlmduo."""
    flag = "" if pair == "default" else f" --pair {pair}"
    return f'vlmduo ask example "{EXAMPLE_QUESTION}"{flag}'


def pull_command(names: list[str], pair: str | None) -> str:
    """``vlmduo pull --pair P`` when the whole pair is wanted, else the names."""
    return f"vlmduo pull --pair {pair}" if pair else "vlmduo pull " + " ".join(names)


def ways_to_go_on(
    missing: list[Any],
    pair: str | None,
    *,
    offline: bool,
    download: bool = True,
    roles: tuple[str, ...] = ("small", "large"),
) -> str:
    """The hint of an error that leaves ``missing`` registry models without their files:
    download them (unless a download just failed), use the synthetic pair, or point the
    ``roles`` at local ``.gguf`` files."""
    models = "/".join(f"--{role}" for role in roles)
    projectors = "/".join(f"--{role}-mmproj" for role in roles)
    others = (
        "with no download: --pair synthetic (random weights); or your own files: "
        f"{models} PATH.gguf with {projectors}"
    )
    if not download:
        return f"or, {others}"
    pull = pull_command([m.name for m in missing], pair)
    size = sum(m.size_gb or 0.0 for m in missing)
    online = f"{pull} (~{size:.1f} GB)" if size else pull
    if offline:
        online += " once online, with HF_HUB_OFFLINE unset"
    return f"download: {online}; or, {others}"


def missing_models(refs: list[str]) -> list[Any]:
    """Registry entries among ``refs`` (names or paths) whose Hub files are not all on disk."""
    from vlmduo.models import registry

    models = registry.load_registry().models
    wanted = [models[ref] for ref in dict.fromkeys(refs) if ref in models and models[ref].is_hub]
    if not wanted:  # model files given as paths: no need for huggingface_hub (90 ms to import)
        return []
    from vlmduo.models import hub

    return [entry for entry in wanted if not hub.entry_status(entry).downloaded]


def pair_of(small: str, large: str) -> str | None:
    """The registry pair made of exactly ``small`` and ``large``, if any (``default`` first)."""
    from vlmduo.models import registry

    pairs = registry.load_registry().pairs
    found = [p.name for p in pairs.values() if (p.small, p.large) == (small, large)]
    return "default" if "default" in found else (found[0] if found else None)


def pair_readiness(pair: str = "default", *, offline: bool | None = None) -> PairReadiness:
    """Is ``pair`` downloaded, can the Hub be reached (a HEAD per model file, 3 s each,
    never when offline), and the exact command to run next."""
    from vlmduo.models import hub, registry

    offline = offline_mode() if offline is None else offline
    entries = zip(("small", "large"), registry.load_registry().pair_models(pair), strict=True)
    models = [
        ModelReadiness(e.name, role, e.source, hub.entry_status(e).downloaded, e.size_gb)
        for role, e in entries
    ]
    endpoint = hub.hub_endpoint()
    hub_models = [m for m in models if m.source == "hub"]
    if not hub_models:
        state = "not needed (no model of this pair comes from the Hub)"
    elif offline:
        state = "not checked: offline mode is on (HF_HUB_OFFLINE)"
    else:
        state = _probe_hub(hub_models)
    return PairReadiness(pair, models, endpoint, state, _next_steps(pair, models, state, offline))


def _probe_hub(models: list[ModelReadiness]) -> str:
    """HEAD each model file on the Hub; the first network failure ends the probe."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from vlmduo.models import hub, registry

    endpoint = hub.hub_endpoint()
    entries = registry.load_registry().models
    for model in models:
        entry = entries[model.name]
        url = hf_hub_url(entry.repo or "", entry.file or "", revision=entry.revision, endpoint=endpoint)
        try:
            get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, endpoint=endpoint, library_name="vlmduo")
        except hf_errors.HfHubHTTPError as exc:  # the Hub answered, with an error
            status = exc.response.status_code if exc.response is not None else "?"
            if status in (401, 403):
                model.hub = f"needs a token: HTTP {status} for {entry.repo} (gated or private)"
            elif status == 404:
                model.hub = f"not found: HTTP 404 for {entry.repo}/{entry.file}"
            else:
                model.hub = f"unexpected answer: HTTP {status} for {entry.repo}/{entry.file}"
        except (hf_errors.LocalEntryNotFoundError, *hub._network_errors()) as exc:
            return f"unreachable: {type(exc).__name__}: {_first_line(exc)}"
        except Exception as exc:  # noqa: BLE001 - doctor reports, never raises
            model.hub = f"unexpected answer: {type(exc).__name__}: {_first_line(exc)}"
        else:
            model.hub = "found"
    return "reachable"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:120]


def _next_steps(
    pair: str, models: list[ModelReadiness], hub_state: str, offline: bool
) -> list[dict[str, str]]:
    """Commands to run next, each with a short note: the first is the one to run."""
    missing = [m for m in models if m.source == "hub" and not m.downloaded]
    if not missing:
        return [{"command": ask_command(pair), "note": "the pair is ready"}]
    synthetic = {
        "command": f'vlmduo ask example "{EXAMPLE_QUESTION}" --pair synthetic',
        "note": "meanwhile, with no download: random-weight models, real latency",
    }
    pull = pull_command([m.name for m in missing], pair)
    size = sum(m.size_gb or 0.0 for m in missing)
    about = f"~{size:.1f} GB into the Hugging Face cache" if size else "into the Hugging Face cache"
    not_found = [m for m in models if m.hub and m.hub.startswith("not found")]
    gated = [m for m in models if m.hub and m.hub.startswith("needs a token")]
    if offline:
        first = {"command": f"HF_HUB_OFFLINE=0 {pull}", "note": f"{about}, once online"}
    elif hub_state.startswith("unreachable"):
        note = f"{about}, once the Hub answers: check the network, a proxy or HF_ENDPOINT"
        first = {"command": pull, "note": note}
    elif not_found:
        names = ", ".join(f"[models.{m.name}]" for m in not_found)
        note = f"the Hub lacks a file of {names}: override it in $VLMDUO_HOME/models.toml"
        first = {"command": "vlmduo models", "note": note}
    elif gated:
        names = " and ".join(m.name for m in gated)
        note = f"{about}; {names} needs a token: accept the model's terms on the Hub, then put the token here"
        first = {"command": f"HF_TOKEN=hf_... {pull}", "note": note}
    else:
        first = {"command": pull, "note": f"{about} (vlmduo ask would also download them first)"}
    return [first, synthetic]
