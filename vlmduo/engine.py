"""One loaded VLM (GGUF model + mmproj) with each inference stage exposed.

Built on llama-cpp-python's low-level bindings and libmtmd, because the
high-level ``Llama`` class hides the stages vlmduo must time and control:
image preprocess, vision encode, prefill, token-by-token decode, and reuse of
the KV cache of a prompt prefix (the duo pipeline appends to it).

A ``VisionLanguageModel`` is loaded once and kept; each question gets a
``Session`` over the model's single KV sequence.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmduo import chat, gguf_check, llama_logs
from vlmduo.errors import ContextOverflowError, EngineError, ModelError
from vlmduo.images import LoadedImage
from vlmduo.timing import StageTimes

_backend_lock = threading.Lock()
_backend_ready = False


@dataclass(frozen=True)
class EngineSettings:
    """How to run a model; the few llama.cpp knobs vlmduo exposes."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None  # None: all cores
    n_gpu_layers: int = -1  # -1: every layer when a GPU backend is built in
    verbose: bool = False

    def threads(self) -> int:
        """Threads for llama.cpp: the setting, else every core."""
        return self.n_threads or os.cpu_count() or 1


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

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(self.pieces)


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    import llama_cpp

    llama_logs.install(verbose)
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build can offload layers to a GPU (CUDA, Metal, ...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


class VisionLanguageModel:
    """A GGUF language model plus its projector, loaded once and kept."""

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path | None,
        settings: EngineSettings | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        self.name = name or Path(model_path).stem
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path) if mmproj_path else None
        self.load_times = StageTimes()
        self._model = None
        self._ctx = None
        self._mtmd = None
        with self.load_times.measure("load"):
            self._load()

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        import llama_cpp

        info = gguf_check.read_info(self.model_path, kind="model")
        proj = gguf_check.read_info(self.mmproj_path, kind="mmproj") if self.mmproj_path else None
        if proj is not None:
            gguf_check.check_pair(info, proj)
        self.info = info
        _init_backend(self.settings.verbose)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.settings.n_gpu_layers if gpu_offload_supported() else 0
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise ModelError(
                f"llama.cpp could not load {self.model_path.name}: "
                + llama_logs.last_error("unsupported or damaged model")
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._new_context()
        if self.mmproj_path is not None:
            self._load_projector()
        self._piece_cache: dict[int, bytes] = {}
        self._batch = llama_cpp.llama_batch_init(1, 0, 1)

    def _new_context(self) -> None:
        import llama_cpp

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.settings.n_ctx
        cparams.n_batch = self.settings.n_batch
        cparams.n_ubatch = self.settings.n_batch
        cparams.n_threads = self.settings.threads()
        cparams.n_threads_batch = self.settings.threads()
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise ModelError(
                f"llama.cpp could not create a {self.settings.n_ctx}-token context "
                f"for {self.model_path.name}: " + llama_logs.last_error("out of memory?")
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        # llama.cpp clamps the batch to the context (and the micro-batch to the
        # batch); libmtmd's helpers assert when handed a larger one than the
        # context's batch holds, so use what llama.cpp actually allocated.
        self.n_batch = min(llama_cpp.llama_n_batch(self._ctx), llama_cpp.llama_n_ubatch(self._ctx))

    def _load_projector(self) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu_offload_supported() and self.settings.n_gpu_layers != 0
        params.n_threads = self.settings.threads()
        params.print_timings = False
        params.warmup = False
        self._mtmd = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, params)
        if not self._mtmd:
            raise ModelError(
                f"libmtmd could not load projector {self.mmproj_path.name}: "
                + llama_logs.last_error("unsupported projector")
            )
        if not mtmd.mtmd_support_vision(self._mtmd):
            raise ModelError(f"{self.mmproj_path.name} has no vision encoder")
        self.marker = mtmd.mtmd_default_marker().decode()

    def set_threads(self, n_threads: int) -> None:
        """Threads for decode and prefill from now on (two models at once share the cores)."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads)

    @property
    def has_vision(self) -> bool:
        """True when a projector is loaded (image questions possible)."""
        return self._mtmd is not None

    def close(self) -> None:
        """Free llama.cpp resources (also done at interpreter exit by the OS)."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        if self._mtmd:
            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # -- text ------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of ``text`` (no BOS added); ``special`` parses control tokens."""
        import llama_cpp

        data = text.encode()
        size = len(data) + 8
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, size, False, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` costs this model."""
        return len(self.tokenize(text, special=False))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (cached: the decode loop asks for every token)."""
        cached = self._piece_cache.get(token)
        if cached is None:
            import llama_cpp

            buf = ctypes.create_string_buffer(128)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 128, 0, True)
            cached = buf.raw[: max(n, 0)]
            self._piece_cache[token] = cached
        return cached

    def token_id(self, text: str) -> int | None:
        """The id of ``text`` when it is exactly one token (thinking markers), else None."""
        ids = self.tokenize(text, special=True)
        return ids[0] if len(ids) == 1 else None

    def render_prompt(
        self,
        user_text: str,
        *,
        image: bool,
        system: str | None = None,
        enable_thinking: bool | None = None,
    ) -> str:
        """Chat-formatted prompt for one user turn, image marker first when ``image``."""
        import llama_cpp

        if image and not self.has_vision:
            raise ModelError(f"{self.name} has no projector (mmproj): it cannot see images")
        text = f"{self.marker}\n{user_text}" if image else user_text
        bos = self.piece(llama_cpp.llama_vocab_bos(self._vocab)).decode(errors="ignore")
        eos = self.piece(llama_cpp.llama_vocab_eos(self._vocab)).decode(errors="ignore")
        prompt = chat.render(
            self.info.chat_template,
            text,
            system=system,
            bos_token=bos,
            eos_token=eos,
            enable_thinking=enable_thinking,
        )
        # libmtmd adds BOS itself when the vocabulary asks for it: avoid two.
        if bos and prompt.startswith(bos) and llama_cpp.llama_vocab_get_add_bos(self._vocab):
            prompt = prompt[len(bos) :]
        return prompt

    def session(self) -> Session:
        """A fresh conversation over this model's KV cache (the previous one is cleared)."""
        return Session(self)


class Session:
    """One conversation in sequence 0 of a model's context.

    ``prefill`` fills the KV cache with prompt (and image), ``stream`` decodes,
    ``rewind`` drops everything after a position so a later ``append`` continues
    from a cached prefix without re-encoding the image or re-prefilling it.
    """

    def __init__(self, model: VisionLanguageModel) -> None:
        import llama_cpp

        self.model = model
        self.times = StageTimes()
        self.n_past = 0
        self.n_prompt_tokens = 0
        self.n_image_tokens = 0
        self.n_generated = 0
        self._mem = llama_cpp.llama_get_memory(model._ctx)
        llama_cpp.llama_memory_clear(self._mem, True)

    # -- prompt ----------------------------------------------------------------
    def prefill(self, prompt: str, image: LoadedImage | None = None, *, reserve: int = 0) -> None:
        """Tokenize, encode the image and prefill ``prompt``; ``reserve`` tokens must fit after."""
        import llama_cpp.mtmd_cpp as mtmd

        model = self.model
        if image is None and model.has_vision and model.marker in prompt:
            raise EngineError("prompt has an image marker but no image was given")
        if model._mtmd is None:
            self.append(prompt, stage="prefill", reserve=reserve)
            return
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            with self.times.measure("image"):
                self._tokenize(chunks, prompt, image)
            self._check_fits(mtmd.mtmd_helper_get_n_pos(chunks), reserve)
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                self._eval_chunk(mtmd.mtmd_input_chunks_get(chunks, i))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        if image is not None:
            self.times.add("image", image.decode_ms)

    def _tokenize(self, chunks: object, prompt: str, image: LoadedImage | None) -> None:
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
                + llama_logs.last_error("image/marker count mismatch?")
            )

    def _eval_chunk(self, chunk: object) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        model = self.model
        new_past = llama_cpp.llama_pos(self.n_past)  # in/out: the text path adds to it
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            with self.times.measure("prefill"):
                rc = mtmd.mtmd_helper_eval_chunk_single(
                    model._mtmd,
                    model._ctx,
                    chunk,
                    self.n_past,
                    0,
                    model.n_batch,
                    True,
                    ctypes.byref(new_past),
                )
            self.n_prompt_tokens += n_tokens
        else:
            with self.times.measure("encode"):
                rc = mtmd.mtmd_encode_chunk(model._mtmd, chunk)
                embd = mtmd.mtmd_get_output_embd(model._mtmd)
            if rc != 0:
                raise EngineError(f"vision encoder failed (code {rc}): " + llama_logs.last_error())
            with self.times.measure("prefill"):
                rc = mtmd.mtmd_helper_decode_image_chunk(
                    model._mtmd,
                    model._ctx,
                    chunk,
                    embd,
                    self.n_past,
                    0,
                    model.n_batch,
                    ctypes.byref(new_past),
                    _NO_CALLBACK(),
                    None,
                )
            self.n_image_tokens += n_tokens
        if rc != 0:
            raise EngineError(
                f"llama.cpp failed to prefill the prompt (code {rc}): " + llama_logs.last_error()
            )
        self.n_past = new_past.value

    def append(self, text: str, *, stage: str = "prefill", reserve: int = 0) -> int:
        """Prefill ``text`` after the current position; returns its token count."""
        import llama_cpp

        tokens = self.model.tokenize(text, special=True)
        if not tokens:
            return 0
        self._check_fits(len(tokens), reserve)
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        with self.times.measure(stage):
            step = self.model.n_batch
            for start in range(0, len(tokens), step):
                n = min(step, len(tokens) - start)
                batch = llama_cpp.llama_batch_init(n, 0, 1)
                try:
                    for j in range(n):
                        batch.token[j] = arr[start + j]
                        batch.pos[j] = self.n_past + j
                        batch.n_seq_id[j] = 1
                        batch.seq_id[j][0] = 0
                        batch.logits[j] = start + j == len(tokens) - 1
                    batch.n_tokens = n
                    self._decode(batch)
                finally:
                    llama_cpp.llama_batch_free(batch)
                self.n_past += n
        if stage == "prefill":
            self.n_prompt_tokens += len(tokens)
        return len(tokens)

    def rewind(self, n_past: int) -> None:
        """Forget every position from ``n_past`` on (the prefix before it stays cached)."""
        import llama_cpp

        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot rewind to {n_past} from {self.n_past}")
        if not llama_cpp.llama_memory_seq_rm(self._mem, 0, n_past, -1):
            raise EngineError("llama.cpp could not trim the KV cache for this model")
        self.n_past = n_past

    def _check_fits(self, n_new: int, reserve: int) -> None:
        needed = self.n_past + n_new + reserve
        if needed > self.model.n_ctx:
            raise ContextOverflowError(
                f"{self.model.name}: prompt and image need {self.n_past + n_new} tokens, "
                f"plus {reserve} to generate, but the context holds {self.model.n_ctx}",
                hint=f"raise --ctx (to at least {needed}) or lower the token budgets",
            )

    def _decode(self, batch: object) -> None:
        import llama_cpp

        rc = llama_cpp.llama_decode(self.model._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed (code {rc}): " + llama_logs.last_error())

    # -- generation --------------------------------------------------------------
    def stream(
        self,
        max_tokens: int,
        *,
        grammar: str | None = None,
        stop_tokens: Iterable[int] = (),
        temperature: float = 0.0,
        seed: int = 0,
        logprobs: bool = False,
        cancel: threading.Event | None = None,
        stage: str = "decode",
    ) -> Iterator[TokenEvent]:
        """Generate up to ``max_tokens``, yielding each token as it is decoded.

        A token in ``stop_tokens`` ends the stream and is yielded but not fed
        back, so the caller decides what follows it; end-of-generation tokens
        end it without being yielded. ``generation.stop_reason`` is set on
        ``self.last`` when the stream ends.
        """
        import llama_cpp

        model = self.model
        sampler = _make_sampler(model, grammar, temperature, seed)
        stops = set(stop_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        batch = model._batch
        self.last = Generation()
        start = time.perf_counter()
        try:
            for _ in range(max_tokens):
                if cancel is not None and cancel.is_set():
                    self.last.stop_reason = "cancelled"
                    break
                token = llama_cpp.llama_sampler_sample(sampler, model._ctx, -1)
                if llama_cpp.llama_vocab_is_eog(model._vocab, token):
                    self.last.stop_reason = "eog"
                    break
                lp = _logprob(model, token) if logprobs else None
                text = decoder.decode(model.piece(token))
                self._record(token, text, lp)
                if token in stops:
                    self.last.stop_reason = "stop"
                    yield TokenEvent(token, text, lp, (time.perf_counter() - start) * 1000.0)
                    break
                if self.n_past + 1 > model.n_ctx:
                    self.last.stop_reason = "context"
                    yield TokenEvent(token, text, lp, (time.perf_counter() - start) * 1000.0)
                    break
                batch.n_tokens = 1
                batch.token[0] = token
                batch.pos[0] = self.n_past
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = True
                self._decode(batch)
                self.n_past += 1
                yield TokenEvent(token, text, lp, (time.perf_counter() - start) * 1000.0)
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            self.last.decode_ms = elapsed
            self.times.add(stage, elapsed)
            llama_cpp.llama_sampler_free(sampler)

    def generate(self, max_tokens: int, **kwargs: object) -> Generation:
        """Run ``stream`` to the end and return what it generated."""
        for _ in self.stream(max_tokens, **kwargs):  # type: ignore[arg-type]
            pass
        return self.last

    def _record(self, token: int, text: str, logprob: float | None) -> None:
        self.last.tokens.append(token)
        self.last.pieces.append(text)
        if logprob is not None:
            self.last.logprobs.append(logprob)
        self.n_generated += 1


def _NO_CALLBACK() -> object:
    """A NULL post-decode callback (ctypes spells NULL as an empty prototype call)."""
    import llama_cpp.mtmd_cpp as mtmd

    return mtmd.mtmd_helper_post_decode_callback()


def _make_sampler(model: VisionLanguageModel, grammar: str | None, temperature: float, seed: int) -> object:
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if grammar:
        g = llama_cpp.llama_sampler_init_grammar(model._vocab, grammar.encode(), b"root")
        if not g:
            llama_cpp.llama_sampler_free(chain)
            raise EngineError("llama.cpp rejected the answer grammar: " + llama_logs.last_error())
        llama_cpp.llama_sampler_chain_add(chain, g)
    if temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(40))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(0.95, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def _logprob(model: VisionLanguageModel, token: int) -> float:
    """log p(token) under the model's raw next-token distribution (before any grammar)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(model._ctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(model.n_vocab,))
    top = float(logits.max())
    lse = top + float(np.log(np.exp(logits - top).sum()))
    return float(logits[token]) - lse
