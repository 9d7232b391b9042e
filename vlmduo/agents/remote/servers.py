"""What each OpenAI-compatible engine calls things: constraints, continuation, detection.

Pure functions, no network. The field names come from each server's own request
schema (vLLM's ``ChatCompletionRequest``, SGLang's, llama-server's
``server-common.cpp``, Ollama's OpenAI compatibility page):

- llama-server: ``grammar`` (GBNF, vlmduo.answers.grammars); continue with
  ``continue_final_message`` + ``add_generation_prompt: false`` (older builds
  prefill a trailing assistant message anyway); ``cache_prompt``.
- vLLM: ``structured_outputs: {"choice": [...]}`` or ``{"regex": ...}`` (the old
  ``guided_*`` fields are ignored since v0.12); ``continue_final_message`` +
  ``add_generation_prompt: false``.
- SGLang: ``regex``; ``continue_final_message`` (it has no ``add_generation_prompt``).
- Ollama: ``response_format`` with a JSON schema (``enum``); no continuation field
  is documented: a trailing assistant message is continued.
- OpenAI: ``response_format`` with a strict JSON schema; no continuation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from vlmduo.answers import extract, grammars
from vlmduo.engine.sampling import SamplerSettings
from vlmduo.models.registry import SERVERS

__all__ = [
    "SERVERS",
    "answer_probability",
    "constraint_fields",
    "continuation_fields",
    "detect",
    "read_answer",
    "request_fields",
    "sampling_fields",
]

# Log-probability alternatives asked for (vLLM's default --max-logprobs and OpenAI's cap are 20).
TOP_LOGPROBS = 20
JSON_SERVERS = frozenset({"ollama", "openai"})

# The grammars of vlmduo.answers.grammars as regular expressions (vLLM, SGLang, JSON-schema
# patterns): the same languages, the leading space included.
_NUMBER_RE = r" ?[-+]?(0|[1-9][0-9]{0,8}|[1-9][0-9]{0,2}(,[0-9]{3}){1,2})(\.[0-9]{1,4})?%?\.?"
_UNICODE_RE = "\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff"
_SHORT_RE = f" ?[!-~{_UNICODE_RE}][ -~{_UNICODE_RE}]{{0,{grammars.SHORT_MAX_CHARS - 1}}}"


def answer_choices(fmt: str, options: dict[str, str] | None) -> list[str] | None:
    """The finite set of answers a format allows (choice letters, Yes/No, each also with
    the leading space its token may carry), else None."""
    if fmt == "choice":
        grammar = grammars.grammar_for(fmt, options)  # the letters the grammar allows, one source
        bare = re.findall(r'"([A-Z])"', grammar or "")
    elif fmt == "yesno":
        bare = ["Yes", "No", "yes", "no"]
    else:
        return None
    return bare + [" " + answer for answer in bare]


def answer_regex(fmt: str, options: dict[str, str] | None) -> str | None:
    """The format's answer as a regular expression (None for ``free``)."""
    choices = answer_choices(fmt, options)
    if choices is not None:
        return "(" + "|".join(re.escape(c) for c in choices) + ")"
    return {"number": _NUMBER_RE, "short": _SHORT_RE}.get(fmt)


def _answer_schema(fmt: str, options: dict[str, str] | None) -> dict[str, Any]:
    choices = answer_choices(fmt, options)
    if choices is not None:
        value: dict[str, Any] = {"type": "string", "enum": choices}
    else:
        value = {"type": "string", "pattern": f"^{answer_regex(fmt, options)}$"}
    return {
        "type": "object",
        "properties": {"answer": value},
        "required": ["answer"],
        "additionalProperties": False,
    }


def constraint_fields(server: str, fmt: str, options: dict[str, str] | None) -> dict[str, Any]:
    """The request fields that hold ``server`` to the format's answer ({} for ``free``)."""
    grammar = grammars.grammar_for(fmt, options)
    if grammar is None:
        return {}
    if server == "llama-server":
        return {"grammar": grammar}
    if server == "vllm":
        choices = answer_choices(fmt, options)
        if choices is not None:
            return {"structured_outputs": {"choice": choices}}
        return {"structured_outputs": {"regex": answer_regex(fmt, options)}}
    if server == "sglang":
        return {"regex": answer_regex(fmt, options)}
    schema = {"name": "answer", "schema": _answer_schema(fmt, options)}
    if server == "openai":
        schema["strict"] = True
    return {"response_format": {"type": "json_schema", "json_schema": schema}}


def sampling_fields(server: str, sampler: SamplerSettings) -> dict[str, Any]:
    """``sampler`` as request fields: OpenAI's own everywhere (temperature, top_p, the
    presence and frequency penalties, seed); top_k, min_p and the repeat penalty where the
    server reads them (llama-server ``repeat_penalty``; vLLM and SGLang
    ``repetition_penalty``; Ollama's OpenAI compatibility takes none of the three)."""
    if sampler.greedy:
        return {"temperature": 0.0, "seed": sampler.seed}
    fields: dict[str, Any] = {
        "temperature": sampler.temperature,
        "top_p": sampler.top_p,
        "seed": sampler.seed,
    }
    if sampler.presence_penalty:
        fields["presence_penalty"] = sampler.presence_penalty
    if sampler.frequency_penalty:
        fields["frequency_penalty"] = sampler.frequency_penalty
    if server in ("llama-server", "vllm", "sglang"):
        fields["top_k"] = sampler.top_k if sampler.top_k > 0 else -1
        fields["min_p"] = sampler.min_p
        if sampler.repeat_penalty != 1.0:
            key = "repeat_penalty" if server == "llama-server" else "repetition_penalty"
            fields[key] = sampler.repeat_penalty
    return fields


def continuation_fields(server: str) -> dict[str, Any]:
    """The fields that make ``server`` continue the trailing assistant message in place."""
    if server in ("llama-server", "vllm"):
        return {"continue_final_message": True, "add_generation_prompt": False}
    if server == "sglang":
        return {"continue_final_message": True}
    return {}


def request_fields(server: str) -> dict[str, Any]:
    """Fields every request to ``server`` carries (llama-server: keep the prompt cached)."""
    return {"cache_prompt": True} if server == "llama-server" else {}


def read_answer(
    server: str, fmt: str, options: dict[str, str] | None, text: str
) -> tuple[str | None, bool | None]:
    """The answer in a constrained reply and whether the reply obeyed the constraint.

    A reply that ignored it (a server without the field, an old build) is read
    with ``extract.extract_answer``; ``constrained`` is then False. For ``free``
    there was no constraint: None.
    """
    text = text.strip()
    pattern = answer_regex(fmt, options)
    if fmt == "free" or pattern is None:
        return (text or None), None
    value: str | None = text
    if server in JSON_SERVERS:
        value = _json_answer(text)
    if value is not None and re.fullmatch(pattern, value):
        return extract.constrained_answer(value, fmt), True
    found = extract.extract_answer(text, fmt, options)
    return (found or text or None), False


def _json_answer(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("answer"), str | int | float):
        return str(data["answer"])
    return None


def answer_probability(
    tokens: Sequence[Any], fmt: str, options: dict[str, str] | None, *, json_mode: bool = False
) -> float | None:
    """The constrained answer's probability from the server's log-probs, None without them.

    Servers report the model's raw log-probs, before the constraint. For a finite
    format (choice, yes/no) the answer token's probability is renormalised over
    the allowed answers among the listed alternatives; an allowed answer the
    server did not list is counted at the smallest listed probability, so the
    figure is a lower bound (the confidence policy errs toward waiting). For
    other formats the raw product over the answer's tokens is again a lower bound.
    """
    if not tokens:
        return None
    choices = answer_choices(fmt, options)
    if choices is not None:
        allowed = set(choices)
        for token in tokens:
            if token.text in allowed:
                return _renormalised(token, allowed)
        return None
    if json_mode or fmt == "free":
        return None
    return math.exp(sum(t.logprob for t in tokens if t.text))


def _renormalised(token: Any, allowed: set[str]) -> float:
    """The sampled answer's share of the allowed answers' mass; an answer's forms with and
    without the leading space (" B", "B") are one answer, their masses summed."""
    listed = {text: lp for text, lp in token.top}
    listed[token.text] = token.logprob
    mass: dict[str, float] = {}
    for text, lp in listed.items():
        if text in allowed:
            mass[text.strip()] = mass.get(text.strip(), 0.0) + math.exp(lp)
    answers = {text.strip() for text in allowed}
    floor = math.exp(min(lp for text, lp in token.top)) if token.top else 0.0
    missing = len(answers - set(mass))
    return mass[token.text.strip()] / (sum(mass.values()) + missing * floor)


def detect(models: Any, headers: dict[str, str], url: str) -> str:
    """Which engine serves ``url``, from its ``/v1/models`` reply and headers ("openai" if unsure)."""
    owners = {
        str(item.get("owned_by", "")).lower()
        for item in (models.get("data") or [] if isinstance(models, dict) else [])
        if isinstance(item, dict)
    }
    server_header = headers.get("server", "").lower()
    if "llamacpp" in owners or "llama.cpp" in server_header:
        return "llama-server"
    if "vllm" in owners:
        return "vllm"
    if "sglang" in owners:
        return "sglang"
    if owners & {"library", "ollama"} or urlsplit(url).port == 11434:
        return "ollama"
    return "openai"


def model_ids(models: Any) -> list[str]:
    """The model ids (and aliases) a ``/v1/models`` reply lists."""
    ids: list[str] = []
    for item in models.get("data") or [] if isinstance(models, dict) else []:
        if isinstance(item, dict) and item.get("id"):
            ids.append(str(item["id"]))
            ids += [str(a) for a in item.get("aliases") or () if a]
    return list(dict.fromkeys(ids))
