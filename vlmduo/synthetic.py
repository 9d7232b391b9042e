"""Random-weight vision-language models, built locally with the ``gguf`` package.

A synthetic VLM is a llama-architecture language model plus an ``mlp`` (LLaVA
style) CLIP projector. llama.cpp loads it exactly like a real one: shapes and
metadata matter, values do not. Answers are meaningless, latency is real, which
is what tests of timing and plumbing, ``vlmduo doctor`` and offline latency
studies need. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

# ChatML that only accepts string content (like SmolLM2's): exercises the
# engine's flattening of the image marker into the text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# A few hundred common words: with random weights the output is still word
# salad, but readable salad, which makes CLI output and reasoning selection
# look like what a real model prints.
_WORDS = (
    "the a an is are was were be it this that there here of in on at to from by with and or "
    "not no yes so because then than more less left right top bottom above below next red "
    "blue green black white yellow large small big little one two three four five six seven "
    "eight nine ten zero many few count image picture photo shows show see seen look person "
    "people man woman child dog cat car bus tree house sky water table chair book sign text "
    "number color answer question option first second last step think wait maybe therefore "
    "thus total each both only also what which who where when how why because so let me check "
    "again clearly likely bigger smaller equal same different"
).split()


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a synthetic VLM. Defaults make a tiny model that loads in milliseconds."""

    n_vocab: int = 512
    n_embd: int = 128
    n_layer: int = 2
    n_ff: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx_train: int = 8192
    image_size: int = 64
    patch_size: int = 16
    v_embd: int = 64
    v_layer: int = 2
    v_ff: int = 128
    v_head: int = 4
    seed: int = 0
    # Projector output width; 0 means "the language model's n_embd". Anything
    # else builds a deliberately mismatched pair (for error-path tests).
    proj_embd: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SyntheticSpec:
        """Build from a registry ``synthetic = {...}`` table, rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown synthetic shape keys: {', '.join(unknown)}")
        return cls(**{k: int(v) for k, v in params.items()})

    def validate(self) -> None:
        """Reject shapes llama.cpp would abort on instead of reporting."""
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
        if self.v_embd % self.v_head:
            raise ValueError("v_embd must divide by v_head")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if not len(_base_pieces()) <= self.n_vocab <= MAX_VOCAB:
            raise ValueError(f"n_vocab must be between {len(_base_pieces())} and {MAX_VOCAB}")

    @property
    def image_tokens(self) -> int:
        """Embeddings one image becomes (one per patch for the mlp projector)."""
        return (self.image_size // self.patch_size) ** 2

    def digest(self) -> str:
        """Stable short hash of the shape, so a changed shape gets new files."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def cache_root() -> Path:
    """Where synthetic models are built: ``$VLMDUO_CACHE`` or ``~/.cache/vlmduo``."""
    base = os.environ.get("VLMDUO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmduo"
    )
    return Path(base) / "synthetic"


def synthetic_paths(name: str, params: dict[str, Any]) -> tuple[Path, Path]:
    """Paths of a synthetic entry's model and projector, built or not."""
    spec = SyntheticSpec.from_params(params)
    folder = cache_root() / f"{name}-{spec.digest()}"
    return folder / "model.gguf", folder / "mmproj.gguf"


def ensure_built(name: str, params: dict[str, Any]) -> tuple[Path, Path]:
    """Build a registry entry's synthetic model into the cache unless already there."""
    model_path, mmproj_path = synthetic_paths(name, params)
    if not (model_path.exists() and mmproj_path.exists()):
        build(SyntheticSpec.from_params(params), model_path, mmproj_path, name=name)
    return model_path, mmproj_path


def build(spec: SyntheticSpec, model_path: Path, mmproj_path: Path, *, name: str = "synthetic") -> None:
    """Write a random-weight language model and its projector as GGUF files.

    Files are written to temporary names and renamed, so an interrupted build
    never leaves a half-written model that a later run would try to load.
    """
    spec.validate()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    mmproj_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    for path, writer in ((model_path, _write_language_model), (mmproj_path, _write_projector)):
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        writer(spec, tmp, rng, name)
        os.replace(tmp, path)


def _base_pieces() -> list[str]:
    specials = list(SPECIAL_TOKENS + THINK_TOKENS)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["\u2581" if c == " " else c for c in string.printable[:95]]
    return specials + byte_tokens + chars


MAX_VOCAB = 26**4


def _filler_pieces() -> Iterator[str]:
    letters = string.ascii_lowercase
    for n in (3, 4):
        for combo in itertools.product(letters, repeat=n):
            yield "\u2581" + "".join(combo)


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """An SPM vocabulary: specials, byte fallback, single characters, then words.

    llama.cpp's SPM tokenizer only reaches a multi-character piece through
    merges whose intermediate pieces exist, so each word brings its prefixes.
    """
    from gguf import TokenType

    pieces = _base_pieces()
    seen = set(pieces)
    extra: list[str] = []
    candidates = [w2 for w in _WORDS for w2 in ("\u2581" + w, w)]
    candidates += [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    candidates += ["\u2581" + a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    for word in candidates:
        for end in range(2, len(word) + 1):
            piece = word[:end]
            if piece not in seen:
                seen.add(piece)
                extra.append(piece)
    pieces += extra
    # Pad with three- and four-letter pieces; a duplicate piece makes llama.cpp
    # abort while loading (its token maps must be the same size), so skip any
    # piece already present.
    for filler in _filler_pieces():
        if len(pieces) >= n_vocab:
            break
        if filler not in seen:
            seen.add(filler)
            pieces.append(filler)
    pieces = pieces[:n_vocab]
    types = []
    for piece in pieces:
        if piece == "<unk>":
            types.append(TokenType.UNKNOWN)
        elif piece in SPECIAL_TOKENS:
            types.append(TokenType.CONTROL)
        elif piece in THINK_TOKENS:
            types.append(TokenType.USER_DEFINED)
        elif piece.startswith("<0x") and len(piece) == 6:
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    # Longer pieces score higher so merges prefer whole words.
    scores = [float(len(p)) if t == TokenType.NORMAL else 0.0 for p, t in zip(pieces, types, strict=True)]
    return pieces, scores, [int(t) for t in types]


def _random(rng: np.random.Generator, *shape: int, scale: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


def _write_language_model(spec: SyntheticSpec, path: Path, rng: np.random.Generator, name: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"{name} (synthetic, random weights)")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.n_embd // spec.n_head)
    w.add_vocab_size(spec.n_vocab)
    pieces, scores, types = vocabulary(spec.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(pieces.index("<unk>"))
    w.add_bos_token_id(pieces.index("<s>"))
    w.add_eos_token_id(pieces.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    kv_dim = spec.n_embd // spec.n_head * spec.n_head_kv
    # Random embeddings of unit-ish scale keep activations from vanishing, so
    # logits differ between tokens and greedy decoding is well defined.
    w.add_tensor("token_embd.weight", _random(rng, spec.n_vocab, spec.n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    w.add_tensor("output.weight", _random(rng, spec.n_vocab, spec.n_embd, scale=0.5))
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        w.add_tensor(f"{blk}.attn_q.weight", _random(rng, spec.n_embd, spec.n_embd))
        w.add_tensor(f"{blk}.attn_k.weight", _random(rng, kv_dim, spec.n_embd))
        w.add_tensor(f"{blk}.attn_v.weight", _random(rng, kv_dim, spec.n_embd))
        w.add_tensor(f"{blk}.attn_output.weight", _random(rng, spec.n_embd, spec.n_embd))
        w.add_tensor(f"{blk}.ffn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_gate.weight", _random(rng, spec.n_ff, spec.n_embd))
        w.add_tensor(f"{blk}.ffn_up.weight", _random(rng, spec.n_ff, spec.n_embd))
        w.add_tensor(f"{blk}.ffn_down.weight", _random(rng, spec.n_embd, spec.n_ff))
    _finish(w)


def _write_projector(spec: SyntheticSpec, path: Path, rng: np.random.Generator, name: str) -> None:
    import gguf

    out_embd = spec.proj_embd or spec.n_embd
    n_pos = spec.image_tokens
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(f"{name} projector (synthetic, random weights)")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", spec.image_size)
    w.add_uint32("clip.vision.patch_size", spec.patch_size)
    w.add_uint32("clip.vision.embedding_length", spec.v_embd)
    w.add_uint32("clip.vision.feed_forward_length", spec.v_ff)
    w.add_uint32("clip.vision.block_count", spec.v_layer)
    w.add_uint32("clip.vision.projection_dim", out_embd)
    w.add_uint32("clip.vision.attention.head_count", spec.v_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    d, p = spec.v_embd, spec.patch_size
    # Conv kernels are stored in f16 as the real converters write them.
    w.add_tensor("v.patch_embd.weight", _random(rng, d, 3, p, p).astype(np.float16))
    w.add_tensor("v.patch_embd.bias", np.zeros(d, dtype=np.float32))
    w.add_tensor("v.position_embd.weight", _random(rng, n_pos, d))
    for i in range(spec.v_layer):
        blk = f"v.blk.{i}"
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{blk}.{proj}.weight", _random(rng, d, d))
            w.add_tensor(f"{blk}.{proj}.bias", np.zeros(d, dtype=np.float32))
        for norm in ("ln1", "ln2"):
            w.add_tensor(f"{blk}.{norm}.weight", np.ones(d, dtype=np.float32))
            w.add_tensor(f"{blk}.{norm}.bias", np.zeros(d, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_up.weight", _random(rng, spec.v_ff, d))
        w.add_tensor(f"{blk}.ffn_up.bias", np.zeros(spec.v_ff, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_down.weight", _random(rng, d, spec.v_ff))
        w.add_tensor(f"{blk}.ffn_down.bias", np.zeros(d, dtype=np.float32))
    hidden = out_embd
    w.add_tensor("mm.0.weight", _random(rng, hidden, d))
    w.add_tensor("mm.0.bias", np.zeros(hidden, dtype=np.float32))
    w.add_tensor("mm.2.weight", _random(rng, out_embd, hidden))
    w.add_tensor("mm.2.bias", np.zeros(out_embd, dtype=np.float32))
    _finish(w)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
