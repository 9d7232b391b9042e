"""Dataset loading: MMBench TSV, JSON Lines and folders, built in tmp_path by the tests."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlmduo.errors import DatasetError
from vlmduo.study.datasets import BadItem, EvalItem, build_question, load_dataset

MMBENCH_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "l2-category",
    "split",
]


def png_bytes(color: str = "red", size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_tsv(path: Path, rows: list[list[str]], header: list[str] = MMBENCH_HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mmbench_rows() -> list[list[str]]:
    red, blue = b64(png_bytes("red")), b64(png_bytes("blue", (300, 200)))
    return [
        ["0", "What color is the square?", "nan", "red", "blue", "", "", "A", "color", red,
         "perception", "dev"],
        ["1", "Which is bigger?", "Look at the sizes.", "cat", "dog", "mouse", "nan", "B",
         "size", blue, "reasoning", "dev"],
        # MMBench repeats an image by pointing at another row's index.
        ["2", "Is the square\nred or blue?", "", "blue", "red", "nan", "nan", "B", "color", "0",
         "perception", "dev"],
        ["3", "Broken image?", "", "x", "y", "", "", "A", "color", "!!!not base64!!!",
         "perception", "dev"],
        ["4", "Answer out of range?", "", "x", "y", "", "", "C", "color", red, "perception",
         "dev"],
        ["5", "No answer?", "", "x", "y", "", "", "", "color", red, "perception", "dev"],
        ["6", "Not an image", "", "x", "y", "", "", "A", "color", b64(b"plain text " * 20),
         "perception", "dev"],
        ["7", "Too few fields"],
    ]  # fmt: skip


def test_mmbench_tsv_items_and_bad_rows(tmp_path: Path) -> None:
    ds = load_dataset(write_tsv(tmp_path / "mmbench_dev.tsv", mmbench_rows()))
    assert ds.name == "mmbench_dev"
    assert [item.id for item in ds.items] == ["0", "1", "2"]
    first, second, third = ds.items
    assert first == EvalItem(
        id="0",
        question="What color is the square?",
        options={"A": "red", "B": "blue"},
        answer="A",
        category="color",
        hint=None,
        image_path=None,
        image_bytes=png_bytes("red"),
    )
    assert second.options == {"A": "cat", "B": "dog", "C": "mouse"}
    assert second.hint == "Look at the sizes."
    assert Image.open(io.BytesIO(second.image_bytes)).size == (300, 200)
    assert third.question == "Is the square\nred or blue?"
    assert third.image_bytes == first.image_bytes
    reasons = {bad.id: bad.reason for bad in ds.bad}
    assert set(reasons) == {"3", "4", "5", "6", "7"}
    assert "base64" in reasons["3"]
    assert "'C' is not among the options (A, B)" in reasons["4"]
    assert reasons["5"] == "missing answer"
    assert "not an image" in reasons["6"]
    assert "fields" in reasons["7"]


def test_mmbench_large_fields_over_csv_default_limit(tmp_path: Path) -> None:
    # Random pixels do not compress, so the base64 field is far over csv's 128 KiB default.
    noisy = Image.frombytes("RGB", (300, 300), random.Random(0).randbytes(300 * 300 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert len(b64(buf.getvalue())) > 131072
    rows = [["9", "q", "", "a", "b", "", "", "b", "", b64(buf.getvalue())]]
    ds = load_dataset(write_tsv(tmp_path / "big.tsv", rows, MMBENCH_HEADER[:10]))
    assert ds.bad == []
    assert ds.items[0].image_bytes == buf.getvalue()
    assert ds.items[0].answer == "B"  # a lower-case letter still names the option
    assert ds.items[0].category is None


def test_mmbench_missing_columns_is_a_dataset_error(tmp_path: Path) -> None:
    header = ["index", "question", "A", "B", "category", "image"]
    path = write_tsv(tmp_path / "test_split.tsv", [["0", "q", "a", "b", "c", "x"]], header)
    with pytest.raises(DatasetError, match="no answer column"):
        load_dataset(path)


def test_jsonl_image_forms_and_options(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cat.png").write_bytes(png_bytes("white"))
    data = png_bytes("black")
    records = [
        {"id": "rel", "image": "imgs/cat.png", "question": "What animal?", "answer": "cat"},
        {"id": "abs", "image": str(tmp_path / "imgs" / "cat.png"), "question": "q", "answer": 3},
        {"id": "url", "image": "https://example.com/a.jpg", "question": "q", "answer": "yes"},
        {"id": "raw", "image": b64(data), "question": "q", "options": ["x", "y"], "answer": "B"},
        {"id": "uri", "image": "data:image/png;base64," + b64(data), "question": "q",
         "options": {"a": "one", "b": "two"}, "answer": "two", "category": "count",
         "hint": "h"},
        {"index": 7, "image": "imgs/cat.png", "question": "q", "answer": True},
    ]  # fmt: skip
    ds = load_dataset(write_jsonl(tmp_path / "set.jsonl", records))
    assert ds.bad == []
    items = {item.id: item for item in ds.items}
    assert list(items) == ["rel", "abs", "url", "raw", "uri", "7"]
    cat = str((tmp_path / "imgs" / "cat.png").resolve())
    assert (items["rel"].image_path, items["rel"].image_bytes) == (cat, None)
    assert items["rel"].options == {}
    assert items["abs"].image_path == cat and items["abs"].answer == "3"
    assert items["url"].image_path == "https://example.com/a.jpg"
    assert items["raw"].image_bytes == data and items["raw"].options == {"A": "x", "B": "y"}
    assert items["uri"].image_bytes == data
    assert items["uri"].options == {"A": "one", "B": "two"}
    assert items["uri"].answer == "B"  # given as the option's text
    assert (items["uri"].category, items["uri"].hint) == ("count", "h")
    assert items["7"].answer == "yes"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ('{"question": "q", "answer": "a"', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ({"image": "https://x/a.png", "answer": "a"}, "missing question"),
        ({"image": "https://x/a.png", "question": "q"}, "missing answer"),
        ({"question": "q", "answer": "a"}, "missing image"),
        ({"image": "nowhere.png", "question": "q", "answer": "a"}, "image file not found"),
        ({"image": "data:image/png,abc", "question": "q", "answer": "a"}, "not base64"),
        ({"image": "data:image/png;base64,@@@", "question": "q", "answer": "a"}, "undecodable"),
        ({"image": "A" * 100, "question": "q", "answer": "a"}, "not an image"),
        (
            {"image": "https://x/a.png", "question": "q", "options": ["x", "y"], "answer": "C"},
            "not among the options",
        ),
        (
            {"image": "https://x/a.png", "question": "q", "options": {"AB": "x"}, "answer": "A"},
            "not a single letter",
        ),
        ({"image": "https://x/a.png", "question": "q", "options": 3, "answer": "A"}, "options"),
    ],
)
def test_jsonl_bad_items(tmp_path: Path, record: object, reason: str) -> None:
    good = {"id": "ok", "image": "https://x/ok.png", "question": "q", "answer": "a"}
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [good, record]))
    assert [item.id for item in ds.items] == ["ok"]
    assert len(ds.bad) == 1
    assert ds.bad[0].id == "line 2"
    assert reason in ds.bad[0].reason


def test_duplicate_ids_are_bad(tmp_path: Path) -> None:
    rec = {"id": "x", "image": "https://x/a.png", "question": "q", "answer": "a"}
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [rec, rec]))
    assert len(ds.items) == 1
    assert ds.bad == [BadItem(id="x", reason="duplicate id")]


def test_folder_with_one_dataset_file(tmp_path: Path) -> None:
    folder = tmp_path / "myset"
    folder.mkdir()
    (folder / "pic.png").write_bytes(png_bytes())
    (folder / "notes.txt").write_text("not a dataset")
    write_jsonl(folder / "items.jsonl", [{"image": "pic.png", "question": "q", "answer": "a"}])
    ds = load_dataset(folder)
    assert ds.name == "myset"
    assert ds.items[0].id == "line 1"
    assert ds.items[0].image_path == str((folder / "pic.png").resolve())

    write_tsv(folder / "other.tsv", [])
    with pytest.raises(DatasetError, match="holds 2 dataset files"):
        load_dataset(folder)


@pytest.mark.parametrize(
    ("name", "match"),
    [("missing.tsv", "not found"), ("data.csv", "unknown dataset format"), ("empty", "no .tsv")],
)
def test_whole_file_errors(tmp_path: Path, name: str, match: str) -> None:
    if name == "data.csv":
        (tmp_path / name).write_text("a,b\n")
    if name == "empty":
        (tmp_path / name).mkdir()
    with pytest.raises(DatasetError, match=match):
        load_dataset(tmp_path / name)


def test_empty_tsv_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "e.tsv").write_text("")
    with pytest.raises(DatasetError, match="no header"):
        load_dataset(tmp_path / "e.tsv")


def test_shuffle_and_limit_are_deterministic(tmp_path: Path) -> None:
    records = [
        {"id": f"q{i}", "image": "https://x/a.png", "question": f"q{i}", "answer": "a"} for i in range(20)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    ids = [f"q{i}" for i in range(20)]

    def load(**kwargs: object) -> list[str]:
        return [item.id for item in load_dataset(path, **kwargs).items]

    assert load(limit=5) == ids[:5]
    assert load(limit=0) == []
    assert load(limit=100) == ids
    shuffled = load(shuffle=True, seed=3)
    assert sorted(shuffled) == sorted(ids) and shuffled != ids
    assert load(shuffle=True, seed=3) == shuffled
    assert load(shuffle=True, seed=3, limit=4) == shuffled[:4]
    assert load(shuffle=True, seed=4) != shuffled
    with pytest.raises(DatasetError, match="limit"):
        load_dataset(path, limit=-1)


@pytest.mark.parametrize(
    ("options", "hint", "expected"),
    [
        ({}, None, "How many cats?"),
        ({"B": "dog", "A": "cat"}, None, "How many cats?\nA. cat\nB. dog"),
        ({"A": "1", "B": "2"}, "Count carefully.", "Hint: Count carefully.\nHow many cats?\nA. 1\nB. 2"),
    ],
)  # fmt: skip
def test_build_question(options: dict[str, str], hint: str | None, expected: str) -> None:
    item = EvalItem("1", "How many cats?", options, "A", None, hint, "https://x/a.png", None)
    assert build_question(item) == expected
