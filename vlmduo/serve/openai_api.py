"""OpenAI's chat-completions schema, mapped onto vlmduo's options and results.

A request is one user message: text parts make the question, at most one
``image_url`` part the image. The model names a mode of the served pair
(``PAIR:duo``, ``PAIR:small``, ``PAIR:large``, ``PAIR:large-think``; the bare mode
or the pair's name alone work too). ``max_tokens`` (or ``max_completion_tokens``),
``temperature`` and ``seed`` map onto the ask's options; ``response_format``'s type
is ``text`` (vlmduo's ``auto``) or one of vlmduo's answer formats (``choice``,
``yesno``, ``number``, ``short``, ``free``); a ``vlmduo`` object sets the rest
(``policy``, ``selector``, ``think_budget``, ...). Every response carries the
``ask --json`` object in an extra ``vlmduo`` field: per-stage timings, the route
and the transferred text. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmduo import __version__
from vlmduo.answers import formats
from vlmduo.duo.pipeline import MODES, AskOptions, AskResult
from vlmduo.errors import Cancelled, ContextOverflowError, ImageError, UsageError, VlmduoError

# The ask's options a request may set (``vlmduo`` object, native ``options``).
_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(AskOptions))
_FORMATS = ("auto", *formats.FORMATS)


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object (plus vlmduo's hint
    and the exit code ``vlmduo ask`` would have used)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        hint: str | None = None,
        exit_code: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.hint = hint
        self.exit_code = exit_code

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param}
        error["code"] = self.code
        if self.hint:
            error["hint"] = self.hint
        error["exit_code"] = self.exit_code
        return {"error": error}


def from_vlmduo_error(exc: VlmduoError) -> ApiError:
    """The response for a failure of the ask itself (bad input, engine failure, cancel)."""
    if isinstance(exc, Cancelled):  # the client went away (and sees nothing) or the server stops
        return ApiError(503, exc.message, type="server_error", code="cancelled", exit_code=exc.exit_code)
    if isinstance(exc, ContextOverflowError):
        status, code = 400, "context_length_exceeded"
    elif isinstance(exc, ImageError):
        status, code = 400, "invalid_image"
    elif isinstance(exc, UsageError):
        status, code = 400, "invalid_value"
    else:
        return ApiError(500, exc.message, type="server_error", hint=exc.hint, exit_code=exc.exit_code)
    return ApiError(status, exc.message, code=code, hint=exc.hint, exit_code=exc.exit_code)


def option_fields(value: Any, param: str, *, fixed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A request's object of ask options (``format`` names ``fmt``), with every name
    checked: one the endpoint sets itself (``fixed``) or that no ask has is a usage error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{param} must be an object of ask options", param=param, exit_code=2)
    fields = dict(value)
    if "format" in fields:
        fields["fmt"] = fields.pop("format")
    known = _OPTION_FIELDS - fixed
    unknown = sorted(set(fields) - known)
    if unknown:
        allowed = ", ".join(sorted("format" if name == "fmt" else name for name in known))
        message = f"unknown option {unknown[0]!r}: choose from {allowed}"
        raise ApiError(400, message, param=param, code="invalid_value", exit_code=2)
    return fields


def ask_options(fields: dict[str, Any]) -> AskOptions:
    """The ask's options from ``option_fields``, checked as ``vlmduo ask`` checks them: a
    mistake is a 400 with the CLI's message, hint and exit code (2, a usage error). Both
    endpoints (native and OpenAI's) read their options through here."""
    try:
        options = AskOptions(**fields)
        options.validate()
    except UsageError as exc:
        raise from_vlmduo_error(exc) from None
    return options


# -- models --------------------------------------------------------------------
def model_ids(pair: str) -> list[str]:
    """The served modes as model ids: ``PAIR:duo``, ``PAIR:small``, ..."""
    return [f"{pair}:{mode}" for mode in MODES]


def models_list(pair: str, models: dict[str, str], created: int) -> dict[str, Any]:
    """The body of ``GET /v1/models``."""
    return {"object": "list", "data": [model_card(pair, mode, models, created) for mode in MODES]}


def model_card(pair: str, mode: str, models: dict[str, str], created: int) -> dict[str, Any]:
    """One model object; ``vlmduo`` says which mode of which models it is."""
    return {
        "id": f"{pair}:{mode}",
        "object": "model",
        "created": created,
        "owned_by": "vlmduo",
        "vlmduo": {"pair": pair, "mode": mode, **{role: models.get(role) for role in ("small", "large")}},
    }


def mode_of(model: Any, pair: str) -> str:
    """The mode a model name asks for; 404 ``model_not_found`` for any other name."""
    if isinstance(model, str):
        name = model.strip()
        if name in MODES:
            return name
        if name == pair:
            return "duo"
        prefix, _, mode = name.rpartition(":")
        if prefix == pair and mode in MODES:
            return mode
    raise ApiError(
        404,
        f"The model {model!r} does not exist: this server serves {', '.join(model_ids(pair))}",
        param="model",
        code="model_not_found",
        hint="GET /v1/models lists them",
    )


# -- requests ------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions request in vlmduo's terms."""

    model: str  # the id answered with
    question: str
    image_url: str | None
    options: AskOptions
    stream: bool = False
    include_usage: bool = False


def parse_chat(body: dict[str, Any], pair: str) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; ApiError (400/404) on any mistake."""
    mode = mode_of(body.get("model"), pair)
    question, image_url = _one_user_turn(body.get("messages"))
    if not question.strip():
        raise ApiError(
            400, "the question is empty: send text with the image", param="messages", code="invalid_value"
        )
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: vlmduo gives one answer per request", param="n")
    for unsupported in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(unsupported):
            raise ApiError(400, f"{unsupported} is not supported by vlmduo", param=unsupported)
    # The mode comes from the model.
    fields = option_fields(body.get("vlmduo"), "vlmduo", fixed=frozenset({"mode"}))
    fields["mode"] = mode
    fmt = _response_format(body.get("response_format"))
    if fmt is not None:
        fields["fmt"] = fmt
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_answer_tokens"] = _int(max_tokens, "max_tokens", minimum=1)
    if body.get("temperature") is not None:
        fields["temperature"] = _number(body["temperature"], "temperature", 0.0, 2.0)
    if body.get("seed") is not None:
        fields["seed"] = _int(body["seed"], "seed")
    options = ask_options(fields)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    return ChatRequest(f"{pair}:{mode}", question, image_url, options, stream, include_usage)


def _one_user_turn(messages: Any) -> tuple[str, str | None]:
    """The question and image URL of the one user message (system messages are ignored)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    users = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            continue
        if role != "user":
            raise ApiError(
                400,
                "vlmduo answers one question about one image: send one user message "
                f"(got a message with role {role!r})",
                param="messages",
            )
        users.append(message)
    if len(users) != 1:
        raise ApiError(400, "send exactly one user message (the question and its image)", param="messages")
    content = users[0].get("content")
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ApiError(400, "a message's content must be a string or a list of parts", param="messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ApiError(400, "image_url must hold a url string", param="messages")
            images.append(url)
        else:
            raise ApiError(
                400, f"unsupported content part {kind!r}: use text and image_url", param="messages"
            )
    if len(images) > 1:
        raise ApiError(400, f"one image per request (got {len(images)})", param="messages")
    return "\n".join(texts), images[0] if images else None


def _response_format(value: Any) -> str | None:
    """``text`` (or none) leaves the format to ``vlmduo.format`` / auto; a vlmduo format names one."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind in _FORMATS:
        return kind
    raise ApiError(
        400,
        f"response_format {kind!r} is not supported: use text, or one of vlmduo's answer formats "
        f"({', '.join(_FORMATS)})",
        param="response_format",
    )


def _int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" of at least {minimum}" if minimum is not None else ""
        raise ApiError(400, f"{name} must be an integer{bound}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


# -- responses -----------------------------------------------------------------
def new_id() -> str:
    """A completion id, as OpenAI spells them."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def reasoning_of(result: AskResult) -> str | None:
    """The reasoning behind the answer: the small agent's (duo, small), the large one's (large-think)."""
    agent = result.large if result.mode == "large-think" else result.small
    return agent.reasoning if agent is not None else None


def usage(data: dict[str, Any]) -> dict[str, int]:
    """Token usage from an ask's JSON: prompt (text and image) and generated tokens of
    both agents, the transfer's prefill and answer included."""
    prompt = completion = 0
    for role in ("small", "large"):
        agent = data.get(role)
        if agent:
            prompt += agent["tokens"]["prompt"] + agent["tokens"]["image"]
            completion += agent["tokens"]["generated"]
    transferred = data.get("transferred") or {}
    prompt += transferred.get("prefill_tokens") or 0
    completion += transferred.get("answer_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(result: AskResult, request: ChatRequest, completion_id: str, created: int) -> dict[str, Any]:
    """The body of a non-streamed chat completion."""
    data = result.to_json()
    message: dict[str, Any] = {"role": "assistant", "content": data["answer"]}
    reasoning = reasoning_of(result)
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "system_fingerprint": f"vlmduo-{__version__}",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage(data),
        "vlmduo": data,
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a stream."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": f"vlmduo-{__version__}",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }


def now() -> int:
    """OpenAI's ``created``: whole seconds since the epoch."""
    return int(time.time())


class StreamRelay:
    """A progress object that passes the text worth streaming to ``sink(kind, text)``.

    ``kind`` is ``reasoning`` (the reasoning agent's thought, as it is decoded) or
    ``content`` (answer text, only where the decode is the final answer: a free-format
    answer in the small, large and large-think modes, or after a transfer in duo).
    Content is trimmed as the pipeline trims the answer; whatever the stream did not
    carry is sent by :meth:`remainder` once the answer is known.
    """

    def __init__(
        self, mode: str, live: bool, sink: Callable[[str, str], None], markers: set[str] | None = None
    ) -> None:
        self.mode = mode
        self.live = live
        self.sink = sink
        self.markers = markers or {"</think>"}
        self.sent = ""
        self._pending = ""  # whitespace held back: the answer is stripped at both ends

    def __call__(self, agent: str, phase: str, tokens: int) -> None:
        """Token counts are not streamed."""

    def on_text(self, agent: str, phase: str, text: str) -> None:
        """One decoded token's text."""
        if phase == "reason":
            if text.strip() not in self.markers:
                self.sink("reasoning", text)
        elif self.live and phase == ("transfer" if self.mode == "duo" else "answer"):
            self._content(text)

    def _content(self, text: str) -> None:
        text = self._pending + text
        if not self.sent:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body) :]
        if body:
            self.sent += body
            self.sink("content", body)

    def remainder(self, answer: str) -> str:
        """The part of the final ``answer`` not streamed yet (all of it when the stream
        carried something else, e.g. a stage-1 answer that a transfer replaced)."""
        return answer[len(self.sent) :] if answer.startswith(self.sent) else answer
