"""The weights of one VLM (GGUF model + mmproj): model, projector, vocabulary, prompts.

Built on llama-cpp-python's low-level bindings and libmtmd, because the
high-level ``Llama`` class hides the stages vlmduo must time and control:
image preprocess, vision encode, prefill, token-by-token decode, and reuse of
the KV cache of a prompt prefix (the duo pipeline appends to it). ``Weights``
are loaded once; the contexts over them are ``vlmduo.engine.model``'s.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from pathlib import Path

from vlmduo.engine import backend, chat, gguf_check, logs, threads
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import ModelError, ProjectorMismatchError
from vlmduo.timing import StageTimes

LLAMA_TOKEN_NULL = -1
# Seconds a projector keeps fewer threads before a quieter machine gets it all of them back.
_REFIT_AFTER_S = 10.0
# The vocabulary tokens libmtmd looks up for a projector type (mtmd.cpp, mtmd_context's
# constructor: lookup_token). A missing one becomes id -1 in every image's prompt and
# mtmd-helper.cpp's GGML_ASSERT(idx >= 0) aborts the process: SmolLM2-135M's own
# vocabulary, for one, lacks SmolVLM's image tokens that SmolVLM2-256M adds to it.
_PROJECTOR_TOKENS = {
    "idefics3": ("\n", "\n\n", "<fake_token_around_image>", "<global-img>"),
    "minicpmv": ("<image>", "</image>", "<slice>", "</slice>"),
    "step3vl": ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"),
    "lfm2": ("<|img_thumbnail|>",),
}
# libmtmd's refusal of a projector whose width differs from the model's (mtmd.cpp).
_MISMATCH = re.compile(
    r"mismatch between text model \(n_embd = (?P<text>\d+)\) and mmproj \(n_embd = (?P<proj>\d+)\)"
)


def _model_info(model: object, path: Path) -> gguf_check.GgufInfo:
    """What vlmduo needs of a loaded model's metadata, from llama.cpp (no second parse)."""
    import llama_cpp

    def meta(key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size + 1)
        return buf.value.decode(errors="replace")

    template = llama_cpp.llama_model_chat_template(model, None)
    return gguf_check.GgufInfo(
        path=path,
        architecture=meta("general.architecture") or "unknown",
        n_embd=llama_cpp.llama_model_n_embd(model),
        projector_type=None,
        chat_template=template.decode(errors="replace") if template else None,
        n_ctx_train=llama_cpp.llama_model_n_ctx_train(model),
    )


def _identity(*paths: Path | None) -> list[object]:
    """What names the weights loaded from ``paths`` (an image cache key part): the
    llama.cpp build (its library file: a state is llama.cpp's own format) and each file,
    with its size and modification time."""
    import llama_cpp.llama_cpp as bindings

    library = getattr(getattr(bindings, "_lib", None), "_name", None)
    parts: list[object] = []
    for path in [Path(library) if library else None, *paths]:
        if path is not None:
            st = path.stat()
            parts.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return parts


class Weights:
    """A GGUF language model plus its projector, loaded once and kept: the weights,
    vocabulary and chat template every context over them shares."""

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
        self._mtmd = None
        # libmtmd keeps one output buffer per projector: an encode and the
        # prefill that reads its embeddings must not interleave across threads.
        self.encode_lock = threading.Lock()
        self._piece_cache: dict[int, bytes] = {}
        with self.load_times.measure("load"):
            try:
                self._load()
            except BaseException:
                self.close()  # a failed load frees what it had loaded
                raise

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        import llama_cpp

        # The projector is read and checked before libmtmd sees it (it is small). The
        # model's header is left to llama.cpp, which refuses a bad model file without
        # aborting: reading it first cost 16-19 ms on a 151,936-token vocabulary, 8% of
        # the load. When llama.cpp refuses, the header is read then, to say why.
        gguf_check.check_file(self.model_path, kind="model")
        # Taken as the files are loaded: a file replaced later does not rename these weights.
        self.identity = _identity(self.model_path, self.mmproj_path)
        proj = gguf_check.read_info(self.mmproj_path, kind="mmproj") if self.mmproj_path else None
        if proj is not None:
            gguf_check.check_projector(proj)
        self.projector_type = proj.projector_type if proj else None
        backend.init(self.settings.verbose)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.settings.n_gpu_layers if backend.gpu_offload_supported() else 0
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            reason = logs.last_error("unsupported or damaged model")
            info = gguf_check.read_info(self.model_path, kind="model")  # corrupt or truncated: raised
            if info.architecture == "clip":
                gguf_check.check_pair(info, proj or info)
            raise ModelError(f"llama.cpp could not load {self.model_path.name}: {reason}")
        self.info = _model_info(self._model, self.model_path)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.bos_id = llama_cpp.llama_vocab_bos(self._vocab)
        wants_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.add_bos = wants_bos and self.bos_id != LLAMA_TOKEN_NULL
        self._open_contexts()
        if self.mmproj_path is not None:
            self._load_projector()

    def _check_projector_tokens(self) -> None:
        """Refuse a projector whose image tokens this vocabulary lacks (libmtmd would abort)."""
        needed = _PROJECTOR_TOKENS.get(self.projector_type or "", ())
        missing = [text for text in needed if self.token_id(text) is None]
        if missing:
            names = ", ".join(repr(text) for text in missing)
            assert self.mmproj_path is not None
            raise ProjectorMismatchError(
                f"projector {self.mmproj_path.name} ({self.projector_type}) needs the token(s) {names} "
                f"that model {self.model_path.name} does not have: they are not a pair",
                hint="use the mmproj file published with this model",
            )

    def _open_contexts(self) -> None:
        """Between the model and the projector: where a subclass opens its first context
        (so a context setting that cannot work fails before the projector loads)."""

    def _load_projector(self) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        self._check_projector_tokens()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = backend.gpu_offload_supported() and self.settings.n_gpu_layers != 0
        params.n_threads = self._projector_threads()
        params.print_timings = False
        params.warmup = False
        params.image_min_tokens = self.settings.image_min_tokens
        params.image_max_tokens = self.settings.image_max_tokens
        self._mtmd = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, params)
        if not self._mtmd:
            reason = logs.last_error("unsupported projector")
            widths = _MISMATCH.search(reason)
            if widths:
                raise ProjectorMismatchError(
                    f"projector {self.mmproj_path.name} produces {widths['proj']}-wide embeddings "
                    f"but model {self.model_path.name} takes {widths['text']}: they are not a pair",
                    hint="use the mmproj file published with this model",
                )
            raise ModelError(f"libmtmd could not load projector {self.mmproj_path.name}: {reason}")
        if not mtmd.mtmd_support_vision(self._mtmd):
            raise ModelError(f"{self.mmproj_path.name} has no vision encoder")
        self.marker = mtmd.mtmd_default_marker().decode()
        self.uses_mrope = bool(mtmd.mtmd_decode_use_mrope(self._mtmd))
        self.projector_threads = params.n_threads
        self._projector_loaded = time.monotonic()

    def _projector_threads(self) -> int:
        """The vision encoder's threads: all configured ones, fewer while other programs
        keep cores busy (libmtmd fixes them when it loads the projector)."""
        if not self.settings.adapt_threads:
            return self.settings.threads()
        return threads.fit(self.settings.threads())

    def fit_projector(self) -> int:
        """Before an image's preprocessing and encode, with ``encode_lock`` held: reload the
        projector when the threads it should run with changed (at once when the machine
        got busier, after ``_REFIT_AFTER_S`` the other way, so a passing load does not
        reload it back and forth); returns the threads it runs with."""
        if self._mtmd is None or not self.settings.adapt_threads:
            return self.projector_threads
        wanted = self._projector_threads()
        settled = time.monotonic() - self._projector_loaded >= _REFIT_AFTER_S
        if wanted < self.projector_threads or (wanted > self.projector_threads and settled):
            import llama_cpp.mtmd_cpp as mtmd

            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
            self._load_projector()
        return self.projector_threads

    @property
    def has_vision(self) -> bool:
        """True when a projector is loaded (image questions possible)."""
        return self._mtmd is not None

    def close(self) -> None:
        """Free every llama.cpp resource; safe to call twice and after a failed load."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        if self._mtmd:
            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # -- text ------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens, ``add_bos`` adds the
        vocabulary's BOS when it wants one."""
        import llama_cpp

        data = text.encode()
        size = len(data) + 8
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n, add_bos, special)
        return list(buf[:n])

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` costs this model, as plain text (no control tokens)."""
        return len(self.tokenize(text, special=False))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (cached: the decode loop asks for every token)."""
        cached = self._piece_cache.get(token)
        if cached is None:
            import llama_cpp

            if not 0 <= token < self.n_vocab:
                return b""  # LLAMA_TOKEN_NULL: a vocabulary without BOS, say
            buf = ctypes.create_string_buffer(128)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 128, 0, True)
            cached = buf.raw[: max(n, 0)]
            self._piece_cache[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end of turn)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

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
        """Chat-formatted prompt for one user turn, image marker first when ``image``.

        The BOS the template writes is dropped when llama.cpp adds it anyway
        (tokenizing with ``add_special``), so the prompt holds exactly one.
        """
        import llama_cpp

        if image and not self.has_vision:
            raise ModelError(f"{self.name} has no projector (mmproj): it cannot see images")
        bos = self.piece(self.bos_id).decode(errors="ignore")
        eos = self.piece(llama_cpp.llama_vocab_eos(self._vocab)).decode(errors="ignore")
        prompt = chat.render(
            self.info.chat_template,
            user_text,
            media_marker=self.marker if image else None,
            system=system,
            bos_token=bos,
            eos_token=eos,
            enable_thinking=enable_thinking,
        )
        if self.add_bos and bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt

    def thinks_natively(self, think_start: str = "<think>", think_end: str = "</think>") -> bool:
        """True when the chat template opens the assistant's thought (Qwen3-VL Thinking's
        ends its generation prompt with ``<think>``), or writes an empty closed one when
        told not to think (a hybrid such as Qwen3's): the model reasons between the
        markers by itself, whatever a registry entry says."""
        if self.info.chat_template is None or think_start not in self.info.chat_template:
            return False
        question = "Is it?"
        opened = self.render_prompt(question, image=False)
        if opened.rstrip().endswith(think_start):
            return True
        closed = self.render_prompt(question, image=False, enable_thinking=False)
        tail = closed[closed.rfind(question) :]
        return think_start in tail and think_end in tail
