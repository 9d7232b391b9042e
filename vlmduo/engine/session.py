"""KV state owned by its user: a llama context, and conversations in it.

A ``Context`` is one llama.cpp context (KV cache, batch, thread setting) over a
model's weights. A ``Session`` is one conversation in sequence 0 of a context;
opening a new session clears the context and makes the older session stale,
so it raises instead of reading another conversation's cache.

Positions and KV cells are different quantities. For M-RoPE families
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) an image advances the position by less than
the number of KV cells it fills; context checks count cells.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vlmduo.engine import logs, prefix_cache, sampling, threads
from vlmduo.engine.prefix_cache import Prefix, PrefixCache
from vlmduo.errors import Cancelled, ContextOverflowError, EngineError, ModelError
from vlmduo.timing import StageTimes

if TYPE_CHECKING:
    import numpy as np

    from vlmduo.engine.weights import Weights


class Pixels(Protocol):
    """What the engine needs of an image: packed RGB888 pixels, row-major
    (``vlmduo.media.images.LoadedImage`` is one), and what decoding them cost."""

    rgb: bytes
    width: int
    height: int
    decode_ms: float


# Decoded tokens between two checks of the threads (vlmduo.engine.threads.fit).
_REFIT_TOKENS = 16


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as streamed by ``Session.stream``."""

    token: int
    text: str
    logprob: float | None
    elapsed_ms: float  # since the stream started


@dataclass
class Generation:
    """A collected stream: what was generated and why it stopped."""

    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = "length"  # eog | length | stop | cancelled | context
    decode_ms: float = 0.0
    # log p(end of generation) at the step that ended it (eog only), under the
    # same distribution as ``logprobs``: the answer's end is part of the answer.
    end_logprob: float | None = None

    @property
    def probability(self) -> float | None:
        """The probability of the whole sequence, its end included (needs logprobs)."""
        if not self.logprobs and self.end_logprob is None:
            return None
        return math.exp(sum(self.logprobs) + (self.end_logprob or 0.0))

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(self.pieces)


class Context:
    """One llama.cpp context over a model's weights, with its own KV cache."""

    def __init__(self, model: Weights) -> None:
        import llama_cpp

        self.model = model
        settings = model.settings
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = settings.n_batch
        cparams.n_threads = settings.threads()
        cparams.n_threads_batch = settings.threads()
        self._ctx = llama_cpp.llama_init_from_model(model._model, cparams)
        if not self._ctx:
            raise ModelError(
                f"llama.cpp could not create a {settings.n_ctx}-token context "
                f"for {model.model_path.name}: " + logs.last_error("out of memory?")
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        # llama.cpp clamps the batch to the context (and the micro-batch to the
        # batch); libmtmd's helpers assert when handed a larger one than the
        # context's batch holds, so use what llama.cpp actually allocated.
        self.n_batch = min(llama_cpp.llama_n_batch(self._ctx), llama_cpp.llama_n_ubatch(self._ctx))
        self.n_threads = settings.threads()  # what llama.cpp runs with now
        self.share = self.n_threads  # the most it may run with (fit lowers it under load)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, 1), 0, 1)
        self._current: Session | None = None

    def session(self, cancel: threading.Event | None = None) -> Session:
        """A fresh conversation; the previous session of this context becomes stale.

        ``cancel``, once set, stops the session's work at the next token, prefill
        batch or graph node (llama.cpp's abort callback) with ``Cancelled``.
        """
        if not self._ctx:
            raise ModelError(f"{self.model.name}: this context is closed")
        self._current = Session(self, cancel)
        return self._current

    @contextlib.contextmanager
    def abortable(self, cancel: threading.Event | None) -> Iterator[None]:
        """Let ``cancel`` abort a running ``llama_decode`` inside the block.

        The callback runs once per graph node: cheap against a prefill batch,
        not against one decoded token, so it is installed for prefills only.
        """
        import llama_cpp

        if cancel is None:
            yield
            return
        callback = llama_cpp.ggml_abort_callback(lambda _data: cancel.is_set())
        llama_cpp.llama_set_abort_callback(self._ctx, callback, None)
        try:
            yield
        finally:
            if self._ctx:
                llama_cpp.llama_set_abort_callback(self._ctx, llama_cpp.ggml_abort_callback(), None)

    def is_current(self, session: Session) -> bool:
        """True while ``session`` is this context's live conversation."""
        return self._current is session and bool(self._ctx)

    @contextlib.contextmanager
    def threads(self, n_threads: int) -> Iterator[None]:
        """At most ``n_threads`` inside the block (the share of the cores it may use),
        what was before restored after it."""
        before = self.share
        self.share = n_threads
        try:
            yield
        finally:
            self.share = before

    def widen(self, n_threads: int) -> None:
        """Allow ``n_threads`` from the next fit on (at most 16 tokens away), inside a
        ``threads`` block, whose exit restores what was before it. Safe while another
        thread decodes here: only the share changes; the decoding thread applies it."""
        self.share = n_threads

    def fit(self) -> int:
        """Run with this context's share of the cores other programs leave free
        (``vlmduo.engine.threads``), from the next graph on; returns the count."""
        import llama_cpp

        n = threads.fit(self.share) if self.model.settings.adapt_threads else self.share
        if n != self.n_threads and self._ctx:
            llama_cpp.llama_set_n_threads(self._ctx, n, n)
            self.n_threads = n
        return n

    def close(self) -> None:
        """Free the context and its batch (idempotent)."""
        import llama_cpp

        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
            self._current = None


@dataclass(frozen=True)
class _ImageSpan:
    pos_start: int  # position where the image begins
    pos_end: int  # position right after it
    n_cells: int  # KV cells it fills


class Session:
    """One conversation in sequence 0 of a context.

    ``prefill`` fills the KV cache with prompt (and image), ``stream`` decodes,
    ``rewind`` drops everything after a position so a later ``append`` continues
    from a cached prefix without re-encoding the image or re-prefilling it.
    ``n_past`` is the next position; ``n_kv`` the KV cells in use.
    """

    def __init__(self, context: Context, cancel: threading.Event | None = None) -> None:
        import llama_cpp

        self.context = context
        self.model = context.model
        self.cancel = cancel
        self.times = StageTimes()
        self.n_past = 0
        self.n_prompt_tokens = 0
        self.n_image_tokens = 0
        self.n_cached_tokens = 0  # prompt tokens restored from a PrefixCache, not computed
        self.n_generated = 0
        self._images: list[_ImageSpan] = []
        # Threads llama.cpp ran each stage with (the last fit of the stage).
        self.threads_used: dict[str, int] = {}
        self._mem = llama_cpp.llama_get_memory(context._ctx)
        llama_cpp.llama_memory_clear(self._mem, True)

    @property
    def n_kv(self) -> int:
        """KV cells in use: positions plus what images fill beyond their positions."""
        return self.n_past + sum(s.n_cells - (s.pos_end - s.pos_start) for s in self._images)

    def _live(self) -> Context:
        if not self.context.is_current(self):
            raise EngineError(f"{self.model.name}: this session is stale (a newer one took its context)")
        self._check_cancel()
        return self.context

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"{self.model.name}: cancelled")

    # -- prompt ----------------------------------------------------------------
    def prefill(
        self,
        prompt: str,
        image: Pixels | None = None,
        *,
        reserve: int = 0,
        cache: PrefixCache | None = None,
    ) -> None:
        """Tokenize, encode the image and prefill ``prompt``; ``reserve`` cells must fit after.

        With ``cache``, the state up to and including the image is restored from it when
        it holds one for this model, image and prompt start (then neither the image's
        preprocessing and encode nor that part's prefill runs: ``n_cached_tokens`` says how
        many tokens were restored), and kept in it when it does not.
        """
        self._live()
        model = self.model
        if image is None and model.has_vision and model.marker in prompt:
            raise EngineError("prompt has an image marker but no image was given")
        if model._mtmd is None:
            if image is not None:
                raise ModelError(f"{model.name} has no projector (mmproj): it cannot see images")
            bos = self.n_past == 0 and model.add_bos
            self._append_tokens(model.tokenize(prompt, special=True, add_bos=bos), "prefill", reserve)
            return
        key = self._prefix_key(prompt, image) if cache is not None else None
        prefix = self._restore(cache, key) if key is not None else None
        after = prompt.rsplit(model.marker, 1)[-1]  # the text after the image
        if prefix is not None and prefix.tail_head is not None:
            # Neither preprocessing nor encode: the text after the image, tokenized as
            # libmtmd tokenizes it (checked when the prefix was kept), is all that is left.
            tail = list(prefix.tail_head) + model.tokenize(after, special=True)
            self._append_tokens(tail, "prefill", reserve)
        else:
            keep = (cache, key, after) if key is not None and prefix is None else None
            self._prefill_chunks(prompt, image, reserve, keep, restored=prefix is not None)
        if image is not None:
            self.times.add("image", image.decode_ms)

    def _prefill_chunks(
        self,
        prompt: str,
        image: Pixels | None,
        reserve: int,
        keep: tuple[PrefixCache, str, str] | None,
        *,
        restored: bool,
    ) -> None:
        """Tokenize through libmtmd (preprocessing the image), then evaluate the chunks:
        those after the image only when its prefix was ``restored``. With ``keep`` (a
        cache, a key and the prompt's text after the image), the state right after the
        image is kept in the cache under the key."""
        import llama_cpp.mtmd_cpp as mtmd

        model = self.model
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            # The projector may be reloaded with other threads (not counted as the image's
            # time): not while another session of this model preprocesses or encodes with it.
            with model.encode_lock:
                if image is not None and not restored:
                    self.threads_used["encode"] = model.fit_projector()
                with self.times.measure("image"):
                    self._tokenize(chunks, prompt, image)
            n_chunks = mtmd.mtmd_input_chunks_size(chunks)
            last_image = _last_image_chunk(chunks, n_chunks)
            first = last_image + 1 if restored else 0
            n_new = sum(_chunk_tokens(chunks, i) for i in range(first, n_chunks))
            self._check_fits(n_new, reserve)
            with self.context.abortable(self.cancel):
                for i in range(first, n_chunks):
                    self._check_cancel()  # between chunks: an image encode is not abortable
                    # The other agent may have finished meanwhile (a wider share), or
                    # other programs started: an image encode takes long.
                    self.threads_used["prefill"] = self.context.fit()
                    self._eval_chunk(mtmd.mtmd_input_chunks_get(chunks, i))
                    if keep is not None and i == last_image:
                        cache, key, after = keep
                        tail = [t for j in range(i + 1, n_chunks) for t in _text_tokens(chunks, j)]
                        cache.put(key, self._prefix(tail, after))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _prefix_key(self, prompt: str, image: Pixels | None) -> str | None:
        """The cache key of the prompt's state up to and including its image: the llama.cpp
        build, the model and projector files, the settings that change that state, the
        prompt's text before the image and the image's pixels. None when the prompt cannot
        share one (no image, not at the conversation's start, or no text after the image:
        a restored state carries no logits, the text after it computes them). A template
        that puts the question before the image gets a key per question: no sharing."""
        model = self.model
        if image is None or self.n_past != 0 or prompt.count(model.marker) != 1:
            return None
        head, tail = prompt.split(model.marker)
        if not tail:
            return None
        settings = model.settings
        bounds = (
            settings.image_min_tokens,
            settings.image_max_tokens,
            settings.n_gpu_layers,
            self.context.n_batch,
        )
        return prefix_cache.digest(model.identity, bounds, head, image_digest(image))

    def _restore(self, cache: PrefixCache | None, key: str) -> Prefix | None:
        """Restore the cached prefix for ``key`` into sequence 0: the prefix, or None when
        the cache has none or llama.cpp refused it (then the sequence is left empty)."""
        import llama_cpp

        assert cache is not None
        with self.times.measure("restore"):
            prefix = cache.get(key)
            if prefix is None:
                return None
            # llama.cpp reads the bytes where they are (no copy of a state of tens of MB).
            data = ctypes.cast(ctypes.c_char_p(prefix.state), ctypes.POINTER(ctypes.c_uint8))
            if llama_cpp.llama_state_seq_set_data(self.context._ctx, data, len(prefix.state), 0) == 0:
                llama_cpp.llama_memory_clear(self._mem, True)
                return None
        self.n_past = prefix.n_past
        self._images = [_ImageSpan(*span) for span in prefix.spans]
        self.n_prompt_tokens += prefix.prompt_tokens
        self.n_image_tokens += prefix.image_tokens
        self.n_cached_tokens += prefix.tokens
        return prefix

    def _prefix(self, tail: list[int], tail_text: str) -> Prefix:
        """This sequence's state now (right after the image) as a cache entry. ``tail``
        is what libmtmd made of the rest of the prompt, ``tail_text``: when ``tail`` is
        some tokens of its own (the image's end marker) followed by exactly what
        ``tokenize`` makes of the text, a later prompt is tokenized without libmtmd."""
        import llama_cpp

        ctx = self.context._ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        spans = tuple((s.pos_start, s.pos_end, s.n_cells) for s in self._images)
        text = self.model.tokenize(tail_text, special=True)
        split = len(tail) - len(text)
        head = tuple(tail[:split]) if split >= 0 and tail[split:] == text else None
        return Prefix(
            ctypes.string_at(buf, written),
            self.n_past,
            spans,
            self.n_prompt_tokens,
            self.n_image_tokens,
            self.model.name,
            head,
        )

    def _tokenize(self, chunks: object, prompt: str, image: Pixels | None) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        data = prompt.encode()
        text = mtmd.mtmd_input_text(text=data, text_len=len(data), add_special=True, parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)()
        n_bitmaps = 0
        bitmap = None
        if image is not None:
            pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
            bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)
            bitmaps[0] = bitmap
            n_bitmaps = 1
        try:
            rc = mtmd.mtmd_tokenize(self.model._mtmd, chunks, ctypes.byref(text), bitmaps, n_bitmaps)
        finally:
            if bitmap:
                mtmd.mtmd_bitmap_free(bitmap)
        if rc != 0:
            raise EngineError(
                f"libmtmd could not tokenize the prompt (code {rc}): "
                + logs.last_error("image/marker count mismatch?")
            )

    def _eval_chunk(self, chunk: object) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        model, ctx = self.model, self.context
        new_past = llama_cpp.llama_pos(self.n_past)  # out: the position after the chunk
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            with self.times.measure("prefill"):
                rc = mtmd.mtmd_helper_eval_chunk_single(
                    model._mtmd, ctx._ctx, chunk, self.n_past, 0, ctx.n_batch, True, ctypes.byref(new_past)
                )
            self.n_prompt_tokens += n_tokens
        else:
            with model.encode_lock:
                with self.times.measure("encode"):
                    rc = mtmd.mtmd_encode_chunk(model._mtmd, chunk)
                    embd = mtmd.mtmd_get_output_embd(model._mtmd)
                if rc != 0:
                    raise EngineError(f"vision encoder failed (code {rc}): " + logs.last_error())
                with self.times.measure("prefill"):
                    rc = mtmd.mtmd_helper_decode_image_chunk(
                        model._mtmd,
                        ctx._ctx,
                        chunk,
                        embd,
                        self.n_past,
                        0,
                        ctx.n_batch,
                        ctypes.byref(new_past),
                        mtmd.mtmd_helper_post_decode_callback(),  # NULL: no callback
                        None,
                    )
            if rc == 0:
                self._images.append(_ImageSpan(self.n_past, new_past.value, n_tokens))
            self.n_image_tokens += n_tokens
        if rc != 0:
            self._check_cancel()  # an abort through the callback fails the decode
            raise EngineError(f"llama.cpp failed to prefill the prompt (code {rc}): " + logs.last_error())
        self.n_past = new_past.value

    def append(self, text: str, *, stage: str = "prefill", reserve: int = 0, special: bool = True) -> int:
        """Prefill ``text`` after the current position; returns its token count.

        ``special=False`` reads control-token text (``<|im_end|>``) as plain
        text: for text another model wrote.
        """
        self._live()
        return self._append_tokens(self.model.tokenize(text, special=special), stage, reserve)

    def _append_tokens(self, tokens: list[int], stage: str, reserve: int) -> int:
        if not tokens:
            return 0
        self._check_fits(len(tokens), reserve)
        self.threads_used[stage] = self.context.fit()
        batch, step = self.context._batch, self.context.n_batch
        with self.times.measure(stage), self.context.abortable(self.cancel if len(tokens) > 1 else None):
            for start in range(0, len(tokens), step):
                self._check_cancel()
                n = min(step, len(tokens) - start)
                for j in range(n):
                    batch.token[j] = tokens[start + j]
                    batch.pos[j] = self.n_past + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = start + j == len(tokens) - 1
                batch.n_tokens = n
                self._decode(batch)
                self.n_past += n
        if stage == "prefill":
            self.n_prompt_tokens += len(tokens)
        return len(tokens)

    def rewind(self, n_past: int) -> None:
        """Forget every position from ``n_past`` on (the prefix before it stays cached)."""
        import llama_cpp

        self._live()
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot rewind to {n_past} from {self.n_past}")
        if any(s.pos_start < n_past < s.pos_end for s in self._images):
            raise ValueError(f"cannot rewind into the middle of an image (position {n_past})")
        if not llama_cpp.llama_memory_seq_rm(self._mem, 0, n_past, -1):
            raise EngineError("llama.cpp could not trim the KV cache for this model")
        self._images = [s for s in self._images if s.pos_end <= n_past]
        self.n_past = n_past

    def _check_fits(self, n_new_cells: int, reserve: int) -> None:
        n_ctx = self.context.n_ctx
        needed = self.n_kv + n_new_cells + reserve
        if needed > n_ctx:
            floor = " (llama.cpp's minimum)" if n_ctx > self.model.settings.n_ctx else ""
            raise ContextOverflowError(
                f"{self.model.name}: prompt and image need {self.n_kv + n_new_cells} tokens, "
                f"plus {reserve} to generate, but the context holds {n_ctx}{floor}",
                hint=f"raise --ctx (to at least {needed}), lower --image-max-tokens or the token budgets",
            )

    def _decode(self, batch: object) -> None:
        import llama_cpp

        rc = llama_cpp.llama_decode(self.context._ctx, batch)
        if rc != 0:
            self._check_cancel()
            raise EngineError(f"llama_decode failed (code {rc}): " + logs.last_error())

    # -- generation --------------------------------------------------------------
    def stream(
        self,
        max_tokens: int,
        *,
        grammar: str | None = None,
        stop_tokens: Iterable[int] = (),
        sampler: sampling.SamplerSettings = sampling.GREEDY,
        logprobs: bool = False,
        cancel: threading.Event | None = None,
        stage: str = "decode",
    ) -> Iterator[TokenEvent]:
        """Generate up to ``max_tokens``, yielding each token as it is decoded.

        A token in ``stop_tokens`` ends the stream and is yielded but not fed
        back, so the caller decides what follows it; end-of-generation tokens
        end it without being yielded. ``self.last`` holds the collected
        generation and its ``stop_reason`` when the stream ends.

        ``sampler`` picks the tokens (greedy by default). ``logprobs`` are the model's
        at temperature 1, before any truncation or penalty of ``sampler``: with a
        grammar, renormalised over the tokens the grammar allows at that step (a
        forced token has probability 1), so a constrained answer's probability
        means what it says.
        """
        import llama_cpp

        ctx = self._live()
        model = self.model
        cancel = cancel or self.cancel
        probe = sampling.LogProbProbe() if logprobs else None
        chain = sampling.make_sampler(model, grammar, sampler, probe)
        stops = set(stop_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        batch = ctx._batch
        self.last = Generation()
        start = time.perf_counter()
        try:
            for step in range(max_tokens):
                if step % _REFIT_TOKENS == 0:  # the load may change during a long generation
                    self.threads_used[stage] = ctx.fit()
                if cancel is not None and cancel.is_set():
                    self.last.stop_reason = "cancelled"
                    break
                token = llama_cpp.llama_sampler_sample(chain, ctx._ctx, -1)
                lp = probe.logprob(ctx._ctx, token) if probe is not None else None
                if model.is_eog(token):
                    self.last.stop_reason = "eog"
                    self.last.end_logprob = lp
                    break
                text = decoder.decode(model.piece(token))
                self._record(token, text, lp)
                event = TokenEvent(token, text, lp, 0.0)
                if token in stops or self.n_kv + 1 > ctx.n_ctx:
                    self.last.stop_reason = "stop" if token in stops else "context"
                    yield _stamped(event, start)
                    break
                batch.n_tokens = 1
                batch.token[0] = token
                batch.pos[0] = self.n_past
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = True
                self._decode(batch)
                self.n_past += 1
                yield _stamped(event, start)
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            self.last.decode_ms = elapsed
            self.times.add(stage, elapsed)
            llama_cpp.llama_sampler_free(chain)  # and the probe's samplers, in its chain

    def generate(self, max_tokens: int, **kwargs: object) -> Generation:
        """Run ``stream`` to the end and return what it generated."""
        for _ in self.stream(max_tokens, **kwargs):  # type: ignore[arg-type]
            pass
        return self.last

    def logits(self) -> np.ndarray:
        """A copy of the logits of the last evaluated token (for tests and analysis)."""
        return _logits(self._live()).copy()

    def _record(self, token: int, text: str, logprob: float | None) -> None:
        self.last.tokens.append(token)
        self.last.pieces.append(text)
        if logprob is not None:
            self.last.logprobs.append(logprob)
        self.n_generated += 1


def _last_image_chunk(chunks: object, n_chunks: int) -> int:
    """The index of the last image chunk in ``chunks`` (-1: none)."""
    import llama_cpp.mtmd_cpp as mtmd

    for i in reversed(range(n_chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            return i
    return -1


def _chunk_tokens(chunks: object, i: int) -> int:
    """The KV cells chunk ``i`` fills."""
    import llama_cpp.mtmd_cpp as mtmd

    return mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))


def _text_tokens(chunks: object, i: int) -> list[int]:
    """The tokens of text chunk ``i`` (none for an image chunk)."""
    import llama_cpp.mtmd_cpp as mtmd

    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
    if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
        return []
    n = ctypes.c_size_t()
    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return list(tokens[: n.value])


def image_digest(image: Pixels) -> str:
    """A digest of an image's pixels and size (what its encode depends on); an image
    that keeps its own (``LoadedImage.digest``) hashes its pixels once."""
    own = getattr(image, "digest", None)
    return own if isinstance(own, str) else prefix_cache.digest(image.width, image.height, image.rgb)


def _stamped(event: TokenEvent, start: float) -> TokenEvent:
    return TokenEvent(event.token, event.text, event.logprob, (time.perf_counter() - start) * 1000.0)


def _logits(ctx: Context) -> np.ndarray:
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(ctx._ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(ctx.model.n_vocab,))
