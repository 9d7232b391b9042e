"""Evaluation datasets: MMBench TSV, JSON Lines, or a folder holding one of them.

A dataset loads into :class:`EvalItem` objects ready for the pipeline. Rows that
cannot be evaluated (a missing field, base64 that does not decode to an image,
an answer letter that is not an option) become :class:`BadItem` entries so a long
evaluation reports them instead of crashing. Only whole-file problems (missing
file, unknown format, missing columns) raise :class:`~vlmduo.errors.DatasetError`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmduo.errors import DatasetError

# MMBench rows carry whole images as base64 in one field, far over csv's 128 KiB default.
# 2**31 - 1 is the largest value csv accepts on every platform (a C long on Windows).
_CSV_FIELD_LIMIT = 2**31 - 1

# pandas writes a missing option as an empty field or "nan"; both mean "no option".
_MISSING = {"", "nan"}

# MMBench repeats an image by putting another row's index in the image field
# (VLMEvalKit's convention: a field this short is a reference, not base64).
_IMAGE_REF_MAX_LEN = 64

_BASE64_RE = re.compile(r"[A-Za-z0-9+/=\s]+")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class EvalItem:
    """One question to evaluate.

    ``options`` maps an option letter to its text and is empty for open questions;
    for multiple choice ``answer`` is the correct letter. Exactly one of
    ``image_path`` (an absolute path or an http(s) URL) and ``image_bytes``
    (decoded base64) is set.
    """

    id: str
    question: str
    options: dict[str, str]
    answer: str
    category: str | None
    hint: str | None
    image_path: str | None
    image_bytes: bytes | None


@dataclass(frozen=True)
class BadItem:
    """A row that cannot be evaluated, and the one-line reason why."""

    id: str
    reason: str


@dataclass
class Dataset:
    """The usable items of a dataset file, and the rows that were not."""

    name: str
    items: list[EvalItem]
    bad: list[BadItem]


class _Bad(Exception):
    """Raised inside row parsing; the loader turns it into a BadItem."""


def load_dataset(path: Path, *, limit: int | None = None, shuffle: bool = False, seed: int = 0) -> Dataset:
    """Load an MMBench ``.tsv``, a ``.jsonl`` file, or a folder holding exactly one.

    ``shuffle`` reorders the items with ``random.Random(seed)`` before ``limit``
    keeps the first ``limit`` of them, so a seed always picks the same subset.
    ``bad`` lists every unusable row of the file, whatever the limit.
    """
    if limit is not None and limit < 0:
        raise DatasetError(f"the item limit must be 0 or more, not {limit}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    name = path.name if path.is_dir() else path.stem
    try:
        file = _dataset_file(path) if path.is_dir() else path
        suffix = file.suffix.lower()
        if suffix == ".tsv":
            items, bad = _load_tsv(file)
        elif suffix == ".jsonl":
            items, bad = _load_jsonl(file)
        else:
            raise DatasetError(
                f"unknown dataset format: {file.name} "
                "(expected an MMBench .tsv, a .jsonl file, or a folder holding one)"
            )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from exc
    if shuffle:
        random.Random(seed).shuffle(items)
    if limit is not None:
        items = items[:limit]
    return Dataset(name=name, items=items, bad=bad)


def build_question(item: EvalItem) -> str:
    """The text the models see: the hint, the question, then one ``A. text`` line per option."""
    lines = []
    if item.hint:
        lines.append(f"Hint: {item.hint}")
    lines.append(item.question)
    lines.extend(f"{letter}. {text}" for letter, text in sorted(item.options.items()))
    return "\n".join(lines)


def rotations(item: EvalItem) -> list[EvalItem]:
    """MMBench's CircularEval passes of a multiple-choice item: pass ``k`` moves every
    option text ``k`` letters up (A's text to the last letter ...), the answer letter
    with it; pass 0 is the item itself, the others have ids ``ID@k``. An open question
    has one pass."""
    letters = sorted(item.options)
    if len(letters) < 2:
        return [item]
    texts = [item.options[letter] for letter in letters]
    right = letters.index(item.answer)
    passes = []
    for k in range(len(letters)):
        options = {letter: texts[(i + k) % len(texts)] for i, letter in enumerate(letters)}
        answer = letters[(right - k) % len(letters)]
        passes.append(
            replace(item, id=item.id if k == 0 else f"{item.id}@{k}", options=options, answer=answer)
        )
    return passes


def _dataset_file(folder: Path) -> Path:
    """The single .tsv or .jsonl file in ``folder``; anything else is ambiguous."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".tsv", ".jsonl"))
    if not found:
        raise DatasetError(f"no .tsv or .jsonl file in dataset folder {folder}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"dataset folder {folder} holds {len(found)} dataset files ({names})")
    return found[0]


def _load_tsv(file: Path) -> tuple[list[EvalItem], list[BadItem]]:
    """Parse an MMBench TSV (index, question, hint, A..D, answer, category, image)."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with file.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"dataset {file} is empty: no header row")
        columns = _tsv_columns(header, file)
        rows = list(reader)
    # Image references point at other rows by index, so index every image first.
    images = {}
    for row in rows:
        if len(row) == len(header):
            images.setdefault(row[columns["index"]].strip(), row[columns["image"]].strip())
    items: list[EvalItem] = []
    bad: list[BadItem] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        item_id = row[columns["index"]].strip() if len(row) > columns["index"] else ""
        item_id = item_id or f"line {number}"
        try:
            if len(row) != len(header):
                raise _Bad(f"row has {len(row)} fields, the header has {len(header)}")
            items.append(_tsv_item(row, columns, item_id, images, seen))
        except _Bad as exc:
            bad.append(BadItem(id=item_id, reason=str(exc)))
    return items, bad


def _tsv_columns(header: list[str], file: Path) -> dict[str, int]:
    """Map lower-case column names (and upper-case option letters) to positions."""
    columns: dict[str, int] = {}
    for position, raw in enumerate(header):
        name = raw.strip()
        key = name.upper() if len(name) == 1 and name.isalpha() else name.lower()
        columns.setdefault(key, position)
    missing = [c for c in ("index", "question", "answer", "image") if c not in columns]
    if missing:
        raise DatasetError(
            f"{file.name} is not an MMBench TSV: no {', '.join(missing)} column"
            + (" (a test split has no answers to score)" if missing == ["answer"] else "")
        )
    return columns


def _tsv_item(
    row: list[str], columns: dict[str, int], item_id: str, images: dict[str, str], seen: set[str]
) -> EvalItem:
    """One MMBench row as an item; raises _Bad when it cannot be evaluated."""

    def field(name: str) -> str | None:
        value = row[columns[name]].strip() if name in columns else ""
        return None if value.lower() in _MISSING else value

    options = {k: v for k in _LETTERS if k in columns and (v := field(k)) is not None}
    image = field("image")
    if image is not None and len(image) <= _IMAGE_REF_MAX_LEN and image in images:
        image = images[image]
    if image is None:
        raise _Bad("missing image")
    return _make_item(
        item_id=item_id,
        question=field("question"),
        options=options,
        answer=field("answer"),
        category=field("category"),
        hint=field("hint"),
        image=(None, _decode_base64(image)),
        seen=seen,
    )


def _load_jsonl(file: Path) -> tuple[list[EvalItem], list[BadItem]]:
    """Parse JSON Lines: image, question, answer, optional options/category/hint/id."""
    items: list[EvalItem] = []
    bad: list[BadItem] = []
    seen: set[str] = set()
    for number, line in _numbered_lines(file):
        item_id = f"line {number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _Bad(f"not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise _Bad("not a JSON object")
            raw_id = record.get("id", record.get("index"))
            if raw_id is not None and str(raw_id).strip():
                item_id = str(raw_id).strip()
            items.append(_jsonl_item(record, item_id, file.parent, seen))
        except _Bad as exc:
            bad.append(BadItem(id=item_id, reason=str(exc)))
    return items, bad


def _numbered_lines(file: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers."""
    with file.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line


def _jsonl_item(record: dict[str, Any], item_id: str, base_dir: Path, seen: set[str]) -> EvalItem:
    """One JSON Lines record as an item; raises _Bad when it cannot be evaluated."""
    return _make_item(
        item_id=item_id,
        question=_text(record.get("question")),
        options=_jsonl_options(record.get("options")),
        answer=_text(record.get("answer")),
        category=_text(record.get("category")),
        hint=_text(record.get("hint")),
        image=_resolve_image(record.get("image"), base_dir),
        seen=seen,
    )


def _text(value: Any) -> str | None:
    """A field as stripped text, None when absent or empty; JSON booleans become yes/no."""
    if value is None:
        return None
    if isinstance(value, bool):
        # A yes/no answer stored as a JSON boolean should still match "yes" / "no".
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        raise _Bad(f"expected text, got a JSON {type(value).__name__}")
    text = str(value).strip()
    return text or None


def _jsonl_options(value: Any) -> dict[str, str]:
    """Options as letter -> text, from a dict keyed by letters or a list (A, B, C, ...)."""
    if value is None:
        return {}
    if isinstance(value, list):
        if len(value) > len(_LETTERS):
            raise _Bad(f"{len(value)} options, more than there are letters")
        pairs = list(zip(_LETTERS, value, strict=False))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise _Bad("options must be a list or an object mapping letters to text")
    options = {}
    for key, text in pairs:
        letter = str(key).strip().upper()
        if len(letter) != 1 or letter not in _LETTERS:
            raise _Bad(f"option key {key!r} is not a single letter")
        if (option := _text(text)) is not None:
            options[letter] = option
    return options


def _make_item(
    *,
    item_id: str,
    question: str | None,
    options: dict[str, str],
    answer: str | None,
    category: str | None,
    hint: str | None,
    image: tuple[str | None, bytes | None],
    seen: set[str],
) -> EvalItem:
    """Check what every format shares and build the item."""
    if item_id in seen:
        # Results are keyed by item id for --resume, so ids must be unique.
        raise _Bad("duplicate id")
    if question is None:
        raise _Bad("missing question")
    if answer is None:
        raise _Bad("missing answer")
    if options:
        answer = _answer_letter(answer, options)
    seen.add(item_id)
    return EvalItem(
        id=item_id,
        question=question,
        options=options,
        answer=answer,
        category=category,
        hint=hint,
        image_path=image[0],
        image_bytes=image[1],
    )


def _answer_letter(answer: str, options: dict[str, str]) -> str:
    """The correct option letter, accepting the option's text in place of its letter."""
    letter = answer.strip().rstrip(".").strip("()").upper()
    if letter in options:
        return letter
    matches = [k for k, text in options.items() if text.casefold() == answer.casefold()]
    if len(matches) == 1:
        return matches[0]
    letters = ", ".join(sorted(options))
    raise _Bad(f"answer {answer!r} is not among the options ({letters})")


def _resolve_image(value: Any, base_dir: Path) -> tuple[str | None, bytes | None]:
    """A JSONL image field as (path or URL, None) or (None, decoded bytes)."""
    if not isinstance(value, str) or not value.strip():
        raise _Bad("missing image")
    text = value.strip()
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _Bad("image data: URI is not base64")
        return None, _decode_base64(payload)
    if text.lower().startswith(("http://", "https://")):
        return text, None
    # A long run of base64 characters with no dot is data, not a file name;
    # checking it as a path first could fail with "file name too long".
    if len(text) > _IMAGE_REF_MAX_LEN and "." not in text and _BASE64_RE.fullmatch(text):
        return None, _decode_base64(text)
    path = Path(text).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        raise _Bad(f"image file not found: {path}")
    return str(path), None


def _decode_base64(text: str) -> bytes:
    """Decode base64 image data, checking that it is an image Pillow recognises."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Bad("undecodable base64 image") from exc
    try:
        # Image.open reads only the header, so this is cheap even for large images.
        with Image.open(io.BytesIO(data)):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        raise _Bad("base64 data is not an image") from exc
    return data
