"""An agent whose model runs on an OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama).

``RemoteAgent`` implements the pipeline's ``AgentLike`` with chat requests. The
transfer repeats the first request's user message (image + question) object
unchanged and adds the transferred reasoning as a trailing assistant message that
the server continues, so its prefix cache serves the image and the question: the
reply's cached-token count says whether it did (``transferred.cached_tokens``).
Timings are the server's own (llama-server reports prompt and generation ms)
plus each request's wall time, in the JSON shape of a local agent.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vlmduo.agents import prompts
from vlmduo.agents.base import (
    AgentResult,
    Progress,
    Question,
    Sampling,
    ShortAnswer,
    Transfer,
    reasoning_sampler,
)
from vlmduo.agents.remote import servers
from vlmduo.agents.remote.client import CancelFlag, Client, Reply, normalize_url, server_root
from vlmduo.answers import extract
from vlmduo.engine.sampling import GREEDY, SamplerSettings
from vlmduo.errors import Cancelled, RemoteError
from vlmduo.timing import now_ms

if TYPE_CHECKING:
    from vlmduo.media.images import LoadedImage
    from vlmduo.models.registry import ModelEntry

log = logging.getLogger("vlmduo.agents.remote")
URL_API_KEY_ENV = "VLMDUO_API_KEY"  # the key sent to a server named by URL#model
DEFAULT_TIMEOUT_S = 300.0
_URL_RE = re.compile(r"^https?://", re.IGNORECASE)
_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class RemoteModel:
    """A model on a server: where it is, its id there, and how it marks its thinking."""

    name: str
    endpoint: str
    model: str | None = None  # None: the one model the server lists
    server: str | None = None  # None: detected from /v1/models
    api_key_env: str | None = URL_API_KEY_ENV
    thinking: bool = False
    think_start: str = "<think>"
    think_end: str = "</think>"
    timeout: float = DEFAULT_TIMEOUT_S
    card: tuple[tuple[str, float], ...] = ()  # the model card's sampling (registry keys)


def is_remote_ref(ref: str) -> bool:
    """True for ``http(s)://HOST[:PORT][/PATH][#MODEL]``."""
    return bool(_URL_RE.match(ref.strip()))


def parse_ref(ref: str) -> RemoteModel:
    """``http://host:8080/v1#model`` -> a RemoteModel (the model id may be left out)."""
    url, _, model = ref.strip().partition("#")
    endpoint = normalize_url(url)
    host = urlsplit(endpoint).netloc
    short = model.rstrip("/").rsplit("/", 1)[-1] if model else ""
    # Without a registry entry, the id is the best hint of a reasoning model (as for .gguf paths).
    return RemoteModel(
        name=short or host,
        endpoint=endpoint,
        model=model or None,
        thinking="think" in model.lower(),
    )


def from_entry(entry: ModelEntry) -> RemoteModel:
    """A registry entry with ``endpoint`` as a RemoteModel."""
    assert entry.endpoint is not None
    return RemoteModel(
        name=entry.name,
        endpoint=normalize_url(entry.endpoint),
        model=entry.model,
        server=entry.server,
        api_key_env=entry.api_key_env,
        thinking=entry.thinking,
        think_start=entry.think_start,
        think_end=entry.think_end,
        timeout=entry.timeout or DEFAULT_TIMEOUT_S,
        card=entry.sampling,
    )


@dataclass
class RemoteResult(AgentResult):
    """A remote agent's result: the local shape plus the server's side of it."""

    server: dict[str, Any] = field(default_factory=dict)
    constrained: bool | None = None  # False: the server ignored the constraint, answer read from text

    def to_json(self) -> dict[str, Any]:
        """The agent object of ``--json`` with ``server`` and ``constrained`` added."""
        data = super().to_json()
        data["server"] = dict(self.server)
        data["constrained"] = self.constrained
        return data


@dataclass
class RemoteShortAnswer(ShortAnswer):
    """A remote short answer keeps the exact user message, to be repeated by the transfer."""

    user: dict[str, Any] | None = None
    cancel: CancelFlag | None = None


class RemoteAgent:
    """An ``AgentLike`` over one model on one server.

    The first call checks the server once (reachable, the model listed, which
    engine it is); after that requests go straight out. Safe to share between
    threads: ``eval --concurrency`` sends several items at once.
    """

    is_remote = True

    def __init__(self, ref: RemoteModel, *, api_key: str | None = None, client: Client | None = None) -> None:
        self.ref = ref
        self.name = ref.name
        self.thinking = ref.thinking
        key = api_key if api_key is not None else os.environ.get(ref.api_key_env or "") or None
        self.client = client or Client(ref.endpoint, api_key=key, timeout=ref.timeout)
        self.server: str | None = ref.server
        self.model: str | None = ref.model
        self.served: list[str] = []
        self._ready = False
        self._lock = threading.Lock()
        self._token_counts: dict[str, int] = {}
        self._tokenizer_ok = True

    # -- the server ------------------------------------------------------------------
    def connect(self, cancel: CancelFlag | None = None) -> None:
        """Check the server once: reachable, the model listed; detect the engine."""
        with self._lock:
            if self._ready:
                return
            try:
                response = self.client.get("/models", cancel=cancel)
            except RemoteError as exc:
                if exc.status != 404:
                    raise
                # No model list here (a bare proxy): trust the model named and the server's kind.
                models, headers = {}, {}
            else:
                models, headers = response.json(), dict(response.headers)
            self.served = servers.model_ids(models)
            if self.server is None:
                self.server = servers.detect(models, headers, self.client.url)
            self.model = self._pick_model()
            self._ready = True

    def _pick_model(self) -> str:
        url, served = self.client.url, self.served
        if self.model is None:
            if len(served) == 1:
                return served[0]
            listed = ", ".join(served[:5]) or "none"
            raise RemoteError(
                f"{url} serves {len(served)} models ({listed}): name one",
                hint=f"use {url}#MODEL",
            )
        if not served or self.model in served:
            return self.model
        if f"{self.model}:latest" in served:  # Ollama's default tag
            return f"{self.model}:latest"
        raise RemoteError(
            f"model '{self.model}' is not served at {url}",
            hint="it serves: " + ", ".join(served[:5]),
        )

    def check(self) -> dict[str, Any]:
        """What ``doctor`` reports: reachable, model listed, vision accepted (one tiny request)."""
        report: dict[str, Any] = {
            "name": self.name,
            "endpoint": self.client.url,
            "model": self.model,
            "server": self.server,
            "reachable": False,
            "model_listed": False,
            "vision": False,
            "error": None,
        }
        try:
            self.client.get("/models")
            report["reachable"] = True
            self.connect()
            report.update(model=self.model, server=self.server, model_listed=True)
            from vlmduo.media.images import synthetic_image

            probe = Question("What is in this image?", synthetic_image(32, 32), "free")
            user, _ = self._user(probe, prompts.answer_text(probe))
            self.client.chat(self._body([user], 1, GREEDY))
            report["vision"] = True
        except RemoteError as exc:
            report["error"] = exc.message
            report["reachable"] = report["reachable"] or exc.status is not None  # it answered
        report["ok"] = bool(report["reachable"] and report["model_listed"] and report["vision"])
        return report

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    # -- AgentLike ---------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` by the server's ``/tokenize`` (llama-server, vLLM), memoised;
        elsewhere an estimate of one token per four bytes."""
        if not text:
            return 0
        cached = self._token_counts.get(text)
        if cached is not None:
            return cached
        count = self._tokenize(text)
        if count is None:
            count = max(1, math.ceil(len(text.encode("utf-8")) / 4))
        if len(self._token_counts) < 4096:
            self._token_counts[text] = count
        return count

    def _tokenize(self, text: str) -> int | None:
        if not self._tokenizer_ok:
            return None
        self.connect()
        root = server_root(self.client.url)
        try:
            if self.server == "llama-server":
                data = self.client.post(f"{root}/tokenize", {"content": text, "add_special": False}).json()
                return len(data["tokens"])
            if self.server == "vllm":
                body = {"model": self.model, "prompt": text, "add_special_tokens": False}
                return int(self.client.post(f"{root}/tokenize", body).json()["count"])
        except (RemoteError, KeyError, TypeError, ValueError):
            self._tokenizer_ok = False
        return None

    def stage1_threads(self, sequential: bool) -> contextlib.AbstractContextManager[None]:
        """A remote agent uses no local cores."""
        return contextlib.nullcontext()

    def solo(self) -> None:
        """A remote agent uses no local cores."""

    def reason(
        self,
        question: Question,
        sampling: Sampling,
        think_budget: int,
        *,
        load_ms: float = 0.0,
        cancel: CancelFlag | None = None,
        progress: Progress | None = None,
        reasoning_logprobs: bool = False,
        image_cache: bool = True,  # the server's prefix cache is its own business
    ) -> AgentResult:
        """Reason for at most ``think_budget`` tokens (one request, the model card's
        sampling), then continue that reply, closed (with Qwen3's hand-off when the
        budget cut it), to a constrained answer (a second request the prefix cache serves)."""
        self.connect(cancel)
        user, image_ms = self._user(question, prompts.reasoning_text(question, self.thinking))
        _tell(progress, self.name, "reason", 0)
        sampler = reasoning_sampler(self.ref.card, sampling)
        body = self._body([user], think_budget, sampler, logprobs=reasoning_logprobs)
        try:
            first = self.client.chat(body, cancel=cancel, on_chunk=_teller(progress, self.name, "reason"))
        except Cancelled:
            return self._cancelled([], None, load_ms, image_ms)
        pieces, logprobs = self._reasoning(first, reasoning_logprobs)
        reasoning = "".join(pieces)
        _tell(progress, self.name, "reason", first.completion_tokens)
        truncated = first.finish_reason == "length"
        if self.thinking:
            closer = prompts.close_thought(reasoning, self.ref.think_end, truncated=truncated)
            prefill = f"{self.ref.think_start}\n{reasoning}{closer}"
        else:
            prefill = reasoning + prompts.close_reasoning(truncated)
        try:
            messages = [user, _assistant(prefill)]
            second = self._constrained(
                messages, question, sampling, cancel, continued=True, progress=progress
            )
        except Cancelled:
            return self._cancelled([first], reasoning.strip(), load_ms, image_ms)
        answer, constrained = self._read(question, second)
        if answer is None:
            answer = extract.extract_answer(reasoning, question.fmt, question.options or None)
        result = self._result([first, second], answer, reasoning.strip(), load_ms, image_ms, constrained)
        result.answer_probability = self._probability(second, question)
        result.reasoning_truncated = truncated
        result.sampling = sampler.to_json()
        result.reasoning_pieces, result.reasoning_logprobs = pieces, logprobs
        _tell(progress, self.name, "answer", second.completion_tokens)
        return result

    def answer_short(
        self,
        question: Question,
        sampling: Sampling,
        *,
        reserve: int = 0,
        load_ms: float = 0.0,
        cancel: CancelFlag | None = None,
        progress: Progress | None = None,
        image_cache: bool = True,  # the server's prefix cache is its own business
    ) -> ShortAnswer:
        """Send the image and question and decode a short constrained answer.

        A thinking model answers after an empty, closed thought (prefilled), as
        the local agent does. ``reserve`` is the server's business (its context).
        """
        self.connect(cancel)
        user, image_ms = self._user(question, prompts.answer_text(question))
        messages = [user]
        if self.thinking:
            messages.append(_assistant(f"{self.ref.think_start}\n\n{self.ref.think_end}\n\n"))
        _tell(progress, self.name, "answer", 0)
        reply = self._constrained(
            messages, question, sampling, cancel, continued=self.thinking, progress=progress
        )
        answer, constrained = self._read(question, reply)
        result = self._result([reply], answer, None, load_ms, image_ms, constrained)
        result.answer_probability = self._probability(reply, question)
        _tell(progress, self.name, "answer", reply.completion_tokens)
        return RemoteShortAnswer(result=result, user=user, cancel=cancel)

    def transfer(
        self,
        short: ShortAnswer,
        question: Question,
        text: str,
        sampling: Sampling,
        *,
        progress: Progress | None = None,
        cancel: CancelFlag | None = None,
    ) -> Transfer:
        """Repeat the short answer's user message unchanged, continue an assistant message
        holding ``text`` and a cue, and decode a constrained answer."""
        if not isinstance(short, RemoteShortAnswer) or short.user is None:
            raise ValueError("this short answer did not come from a remote agent")
        if self.thinking:
            closer = prompts.close_thought(text, self.ref.think_end, truncated=False)
            prefill = f"{self.ref.think_start}\n{text}{closer}"
        else:
            prefill = text + prompts.TRANSFER_CUE
        _tell(progress, self.name, "transfer", 0)
        messages = [short.user, _assistant(prefill)]
        reply = self._constrained(
            messages,
            question,
            sampling,
            cancel or short.cancel,
            continued=True,
            progress=progress,
            phase="transfer",
        )
        answer, constrained = self._read(question, reply)
        cached = reply.cached_tokens
        if cached == 0:
            _warn_once(
                self.client.url,
                f"{self.client.url} re-encoded the image and question for the transfer (0 cached tokens): "
                "its prefix cache is off, too small, or the request went to another replica",
            )
        details = {
            "server": self._kind,
            "cached_tokens": cached,
            "prompt_tokens": reply.prompt_tokens,
            "request_ms": round(reply.wall_ms, 3),
            "constrained": constrained,
        }
        return Transfer(
            answer=answer,
            prefill_ms=reply.prompt_ms or 0.0,
            decode_ms=reply.predicted_ms or 0.0,
            prefill_tokens=reply.prompt_tokens - (cached or 0),
            answer_tokens=reply.completion_tokens,
            probability=self._probability(reply, question),
            details=details,
        )

    # -- requests ----------------------------------------------------------------------
    @property
    def _kind(self) -> str:
        return self.server or "openai"

    def _user(self, question: Question, text: str) -> tuple[dict[str, Any], float]:
        """The user message (image first, as the local prompt has it) with ``text``, and the
        ms spent encoding the image."""
        content: list[dict[str, Any]] = []
        image_ms = 0.0
        if question.image is not None:
            uri, image_ms = image_uri(question.image)
            content.append({"type": "image_url", "image_url": {"url": uri}})
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}, image_ms

    def _body(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int,
        sampler: SamplerSettings,
        *,
        logprobs: bool = False,
        continued: bool = False,
        question: Question | None = None,
    ) -> dict[str, Any]:
        kind = self._kind
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens}
        body.update(servers.sampling_fields(kind, sampler))
        body.update(servers.request_fields(kind))
        if continued:
            body.update(servers.continuation_fields(kind))
        if question is not None:
            body.update(servers.constraint_fields(kind, question.fmt, question.options or None))
        if logprobs:
            body.update(logprobs=True, top_logprobs=servers.TOP_LOGPROBS)
        return body

    def _constrained(
        self,
        messages: list[dict[str, Any]],
        question: Question,
        sampling: Sampling,
        cancel: CancelFlag | None,
        *,
        continued: bool,
        progress: Progress | None = None,
        phase: str = "answer",
    ) -> Reply:
        body = self._body(
            messages,
            sampling.max_answer_tokens,
            dataclasses.replace(GREEDY, seed=sampling.seed),
            logprobs=True,
            continued=continued,
            question=question,
        )
        reply = self.client.chat(body, cancel=cancel, on_chunk=_teller(progress, self.name, phase))
        if continued:
            reply.text = _strip_prefill(reply.text, messages[-1]["content"])
        return reply

    def _reasoning(self, reply: Reply, with_logprobs: bool) -> tuple[list[str], list[float]]:
        """The reasoning as pieces (the server's tokens when it sent log-probs, else words)."""
        start, end = self.ref.think_start, self.ref.think_end
        if reply.tokens:
            pieces, logprobs = [], []
            for token in reply.tokens:
                if self.thinking and token.text.strip() == end:
                    break
                if self.thinking and not pieces and token.text.strip() == start:
                    continue
                pieces.append(token.text)
                logprobs.append(token.logprob)
            return pieces, (logprobs if with_logprobs else [])
        text = reply.reasoning or reply.text
        if self.thinking:
            text = text.split(end)[0] if not reply.reasoning else text
            text = text.lstrip()
            text = text[len(start) :] if text.startswith(start) else text
        return re.findall(r"\s*\S+|\s+$", text), []

    def _read(self, question: Question, reply: Reply) -> tuple[str | None, bool | None]:
        return servers.read_answer(self._kind, question.fmt, question.options or None, reply.text)

    def _probability(self, reply: Reply, question: Question) -> float | None:
        json_mode = self._kind in servers.JSON_SERVERS
        options = question.options or None
        return servers.answer_probability(reply.tokens, question.fmt, options, json_mode=json_mode)

    def _result(
        self,
        replies: list[Reply],
        answer: str | None,
        reasoning: str | None,
        load_ms: float,
        image_ms: float,
        constrained: bool | None,
    ) -> RemoteResult:
        timings: dict[str, float] = {"load": round(load_ms, 3), "image": round(image_ms, 3)}
        for stage, values in (
            ("prefill", [r.prompt_ms for r in replies]),
            ("decode", [r.predicted_ms for r in replies]),
        ):
            if values and all(v is not None for v in values):  # only what the server measured
                timings[stage] = round(sum(v for v in values if v is not None), 3)
        timings["request"] = round(sum(r.wall_ms for r in replies), 3)
        cached = [r.cached_tokens for r in replies if r.cached_tokens is not None]
        return RemoteResult(
            model=self.name,
            answer=answer,
            reasoning=reasoning,
            tokens={
                "prompt": sum(r.prompt_tokens for r in replies),
                "image": 0,  # servers count image tokens into the prompt
                "generated": sum(r.completion_tokens for r in replies),
                "cached": sum(cached) if cached else None,  # type: ignore[dict-item]
            },
            timings_ms=timings,
            server={
                "endpoint": self.client.url,
                "kind": self._kind,
                "model": self.model,
                "requests": len(replies),
                "attempts": sum(r.attempts for r in replies),
            },
            constrained=constrained,
        )

    def _cancelled(
        self, replies: list[Reply], reasoning: str | None, load_ms: float, image_ms: float
    ) -> RemoteResult:
        result = self._result(replies, None, reasoning, load_ms, image_ms, None)
        result.cancelled = True
        return result


def _assistant(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _strip_prefill(text: str, prefill: str) -> str:
    """llama-server echoes the continued message before what it generated; vLLM does not."""
    for head in (prefill, prefill.rstrip(), prefill.strip()):
        if head and text.startswith(head):
            return text[len(head) :]
    return text


def _tell(progress: Progress | None, name: str, phase: str, tokens: int) -> None:
    if progress is not None:
        progress(name, phase, tokens)


def _teller(progress: Progress | None, name: str, phase: str) -> Callable[[int], None] | None:
    """``progress`` as the client's per-chunk callback."""
    if progress is None:
        return None
    return lambda n: progress(name, phase, n)


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)


_uris: OrderedDict[int, tuple[LoadedImage, str]] = OrderedDict()
_uris_lock = threading.Lock()


def image_uri(image: LoadedImage) -> tuple[str, float]:
    """The image as a PNG data URI (lossless: the server sees the pixels vlmduo decoded) and
    the milliseconds spent encoding it; the same image is encoded once (byte-identical)."""
    with _uris_lock:
        hit = _uris.get(id(image))
        if hit is not None and hit[0] is image:
            _uris.move_to_end(id(image))
            return hit[1], 0.0
    from PIL import Image

    start = now_ms()
    buffer = io.BytesIO()
    Image.frombytes("RGB", (image.width, image.height), image.rgb).save(buffer, "PNG", compress_level=1)
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    elapsed = now_ms() - start
    with _uris_lock:
        _uris[id(image)] = (image, uri)
        while len(_uris) > 4:
            _uris.popitem(last=False)
    return uri, elapsed
