"""Answer grammars: what they accept (pure-Python GBNF matcher), that they are
bounded, and that llama.cpp parses them and ends generation when they are done."""

from __future__ import annotations

import ctypes
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlmduo.answers.formats import FORMATS
from vlmduo.answers.grammars import grammar_for
from vlmduo.errors import UsageError

PETS = {"A": "cat", "B": "dog", "C": "bird"}

# --- a tiny matcher for the GBNF subset the grammars use ---------------------------
# Nodes: ("lit", s) ("cls", [(lo, hi)], negated) ("ref", name) ("seq", [..])
# ("alt", [..]) ("rep", node, min, max or None).

_TOKEN_RE = re.compile(
    r'\s*(?:(?P<lit>"(?:[^"\\]|\\.)*")|(?P<cls>\[(?:[^\]\\]|\\.)*\])|(?P<name>[a-z][a-z0-9-]*)'
    r"|(?P<rep>\{\d+(?:,\d*)?\})|(?P<op>[()|?*+]))"
)


def _unescape(text: str) -> str:
    return re.sub(
        r"\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})|\\x([0-9a-fA-F]{2})|\\(.)",
        lambda m: chr(int(m[1] or m[2] or m[3], 16)) if (m[1] or m[2] or m[3]) else m[4],
        text,
    )


def _class(text: str) -> tuple:
    body, negated = text[1:-1], text.startswith("[^")
    chars = _unescape(body[1:] if negated else body)
    ranges, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == "-":
            ranges.append((chars[i], chars[i + 2]))
            i += 3
        else:
            ranges.append((chars[i], chars[i]))
            i += 1
    return ("cls", ranges, negated)


def _parse_body(tokens: list[tuple[str, str]]) -> tuple:
    def alt() -> tuple:
        options = [seq()]
        while tokens and tokens[0] == ("op", "|"):
            tokens.pop(0)
            options.append(seq())
        return ("alt", options)

    def seq() -> tuple:
        items = []
        while tokens and tokens[0] not in (("op", "|"), ("op", ")")):
            kind, text = tokens.pop(0)
            if kind == "lit":
                node = ("lit", _unescape(text[1:-1]))
            elif kind == "cls":
                node = _class(text)
            elif kind == "name":
                node = ("ref", text)
            else:  # "(": a group up to its ")"
                node = alt()
                tokens.pop(0)
            while tokens and (tokens[0][0] == "rep" or tokens[0][1] in ("?", "*", "+")):
                _, rep = tokens.pop(0)
                low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}.get(rep, (None, None))
                if low is None:
                    parts = rep[1:-1].split(",")
                    low = int(parts[0])
                    high = low if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
                node = ("rep", node, low, high)
            items.append(node)
        return ("seq", items)

    return alt()


def parse_gbnf(grammar: str) -> dict[str, tuple]:
    """Rules of a one-rule-per-line GBNF grammar."""
    rules = {}
    for line in grammar.strip().splitlines():
        name, body = line.split("::=", 1)
        tokens = [(m.lastgroup, m[m.lastgroup]) for m in _TOKEN_RE.finditer(body) if m.lastgroup]
        rules[name.strip()] = _parse_body(tokens)
    return rules


def _ends(rules: dict, node: tuple, s: str, pos: int) -> set[int]:
    kind = node[0]
    if kind == "lit":
        return {pos + len(node[1])} if s.startswith(node[1], pos) else set()
    if kind == "cls":
        inside = pos < len(s) and any(lo <= s[pos] <= hi for lo, hi in node[1])
        return {pos + 1} if pos < len(s) and inside != node[2] else set()
    if kind == "ref":
        return _ends(rules, rules[node[1]], s, pos)
    if kind == "alt":
        return set().union(*(_ends(rules, option, s, pos) for option in node[1]))
    if kind == "seq":
        current = {pos}
        for item in node[1]:
            current = set().union(*(_ends(rules, item, s, p) for p in current)) if current else set()
        return current
    _, inner, low, high = node
    current, result = {pos}, {pos} if low == 0 else set()
    for count in range(1, (high if high is not None else len(s) + 1) + 1):
        current = set().union(*(_ends(rules, inner, s, p) for p in current)) if current else set()
        if count >= low:
            result |= current
    return result


def matches(grammar: str, text: str) -> bool:
    """True when ``text`` is a complete sentence of ``grammar``."""
    rules = parse_gbnf(grammar)
    return len(text) in _ends(rules, rules["root"], text, 0)


def max_length(grammar: str) -> float:
    """Longest sentence of ``grammar`` in characters (inf if unbounded)."""
    rules = parse_gbnf(grammar)

    def size(node: tuple, seen: frozenset) -> float:
        kind = node[0]
        if kind == "lit":
            return len(node[1])
        if kind == "cls":
            return 1
        if kind == "ref":
            return math.inf if node[1] in seen else size(rules[node[1]], seen | {node[1]})
        if kind in ("alt", "seq"):
            sizes = [size(n, seen) for n in node[1]] or [0]
            return max(sizes) if kind == "alt" else sum(sizes)
        return math.inf if node[3] is None else node[3] * size(node[1], seen)

    return size(rules["root"], frozenset({"root"}))


# --- what each grammar accepts -----------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "text", "ok"),
    [
        ("choice", PETS, "A", True),
        ("choice", PETS, "C", True),
        ("choice", PETS, " B", True),  # the space Qwen's " B" token carries
        ("choice", PETS, "  B", False),
        ("choice", PETS, "D", False),
        ("choice", PETS, "a", False),
        ("choice", PETS, "AB", False),
        ("choice", PETS, "A.", False),
        ("choice", None, "D", True),
        ("choice", None, "E", False),
        ("choice", {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}, "E", True),
        ("yesno", None, "Yes", True),
        ("yesno", None, " Yes", True),
        ("yesno", None, "no", True),
        ("yesno", None, "YES", False),
        ("yesno", None, "Yes.", False),
        ("yesno", None, "Maybe", False),
        ("number", None, "3", True),
        ("number", None, " 3", True),
        ("number", None, "0", True),
        ("number", None, "-2", True),
        ("number", None, "+2", True),
        ("number", None, "1234", True),
        ("number", None, "3.5", True),
        ("number", None, "-1234567.125", True),
        ("number", None, "123456789", True),
        ("number", None, "1234567890", False),
        ("number", None, "007", False),
        ("number", None, "1,234", True),  # thousands separated
        ("number", None, "1,234,567", True),
        ("number", None, "12,34", False),
        ("number", None, "1,2345", False),
        ("number", None, "3.", True),  # the period that ends the sentence
        ("number", None, "3.5.", True),
        ("number", None, "45%", True),
        ("number", None, "12.5%.", True),
        ("number", None, ".5", False),
        ("number", None, "3 cats", False),
        ("number", None, "", False),
        ("short", None, "red", True),
        ("short", None, " red", True),
        ("short", None, "  red", False),
        ("short", None, "red car", True),
        ("short", None, "red  car", True),
        ("short", None, "Eiffel Tower", True),
        ("short", None, "t-shirt", True),
        ("short", None, "dog's bowl", True),
        ("short", None, "Zürich", True),
        ("short", None, "10:10", True),  # times, prices, names with punctuation, URLs
        ("short", None, "$3.99", True),
        ("short", None, "St. Louis", True),
        ("short", None, "AT&T", True),
        ("short", None, "https://example.org/a?b=c", True),
        ("short", None, "日本語", True),  # any script
        ("short", None, "Привет мир", True),
        ("short", None, "a b c d e f", True),
        ("short", None, "red.", True),
        ("short", None, "red\nblue", False),  # one line
        ("short", None, "\tred", False),
        ("short", None, "", False),
        ("short", None, "x" * 80, True),
        ("short", None, "x" * 81, False),
    ],
)
def test_grammar_language(fmt: str, options: dict[str, str] | None, text: str, ok: bool) -> None:
    grammar = grammar_for(fmt, options)
    assert grammar is not None
    assert matches(grammar, text) is ok


@pytest.mark.parametrize(("fmt", "limit"), [("choice", 2), ("yesno", 4), ("number", 20), ("short", 81)])
def test_grammars_are_bounded(fmt: str, limit: int) -> None:
    assert max_length(grammar_for(fmt, PETS)) == limit


def test_free_has_no_grammar() -> None:
    assert grammar_for("free") is None


def test_choice_ignores_keys_that_are_not_letters() -> None:
    assert grammar_for("choice", {"A": "x", "b": "y", '"': "z", "AB": "w"}) == 'root ::= " "? ("A" | "B")\n'


def test_unknown_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        grammar_for("auto")


# --- llama.cpp ---------------------------------------------------------------------


def _grammars() -> Iterator[tuple[str, str]]:
    for fmt in FORMATS:
        grammar = grammar_for(fmt, PETS)
        if grammar is not None:
            yield fmt, grammar


@pytest.mark.parametrize(("fmt", "grammar"), list(_grammars()))
def test_llama_cpp_parses_grammar(fmt: str, grammar: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_grammar import LlamaGrammar

    assert LlamaGrammar.from_string(grammar, verbose=False) is not None
    # LlamaGrammar only stores the text; llama.cpp's own parser runs when a
    # grammar sampler is made, and returns NULL on an error (no vocab needed).
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    assert sampler, f"llama.cpp rejected the {fmt} grammar"
    llama_cpp.llama_sampler_free(sampler)


def test_llama_cpp_rejects_a_broken_grammar() -> None:
    """Guards the test above: a NULL sampler really means a parse error."""
    llama_cpp = pytest.importorskip("llama_cpp")
    assert not llama_cpp.llama_sampler_init_grammar(None, b"root ::= missing-rule", b"root")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The vocabulary of a tiny synthetic model, loaded without weights."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from vlmduo.models.synthetic import SyntheticSpec, build

    folder: Path = tmp_path_factory.mktemp("grammar-vocab")
    build(SyntheticSpec(), folder / "model.gguf", folder / "mmproj.gguf")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(folder / "model.gguf").encode(), params)
    assert model
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def _generate(llama_cpp, vocab, grammar: str, seed: int, max_steps: int) -> tuple[str, bool]:  # noqa: ANN001
    """Sample random tokens through the grammar; end-of-generation is chosen only
    when the grammar allows nothing else. Returns (text, ended)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    rng = random.Random(seed)
    pieces: list[bytes] = []
    buf = ctypes.create_string_buffer(64)

    def whole(token: int) -> bool:
        # A byte-fallback token alone is part of a character. llama.cpp's grammar checks
        # such a token's lead byte but not the bytes that follow, so random picks among
        # them spell invalid UTF-8, which a trained model does not write: left out.
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        try:
            buf.raw[:n].decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    usable = [whole(i) for i in range(n_vocab)]
    try:
        for _ in range(max_steps):
            data = (llama_cpp.llama_token_data * n_vocab)()
            for i in range(n_vocab):
                eog = llama_cpp.llama_vocab_is_eog(vocab, i)
                logit = -1000.0 if eog else (rng.gauss(0, 1) if usable[i] else -2000.0)
                data[i] = llama_cpp.llama_token_data(i, logit, 0.0)
            cur = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
            allowed = [d for d in data[: cur.size] if d.logit > -math.inf]
            assert allowed, "the grammar left no token (dead end)"
            token = max(allowed, key=lambda d: d.logit).id
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return b"".join(pieces).decode("utf-8"), True
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            pieces.append(buf.raw[:n])
            llama_cpp.llama_sampler_accept(sampler, token)
        return b"".join(pieces).decode("utf-8", errors="replace"), False
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize(("fmt", "grammar"), list(_grammars()))
def test_llama_cpp_generation_ends_inside_the_grammar(fmt: str, grammar: str, vocab: object) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    for seed in range(5):
        text, ended = _generate(llama_cpp, vocab, grammar, seed, max_steps=200)
        assert ended, f"{fmt}: generation did not stop: {text!r}"
        assert matches(grammar, text), f"{fmt}: {text!r} is outside the grammar"
