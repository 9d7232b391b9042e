"""One image, many questions: the state up to and including the image, kept and restored.

The cache's own logic (keys, files, bounds, corrupt and foreign files) table-driven;
restores through llama.cpp on every family's fixture, compared with fresh runs (with a
negative control: another image); the CLI across processes, several questions in one
call, `vlmduo cache`, `--no-image-cache`, a server, and MMBench's CircularEval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_eval_run import TINY, write_mmbench
from test_families import FAMILIES, _build

from vlmduo.agents.local import Agent
from vlmduo.cli.options import parse_size
from vlmduo.duo.pipeline import AskOptions, ask, make_question
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.prefix_cache import DiskPrefixes, Prefix, PrefixCache, digest
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import UsageError
from vlmduo.media.images import synthetic_image
from vlmduo.study.datasets import EvalItem, load_dataset, rotations
from vlmduo.study.eval_run import expand_configs, run_eval
from vlmduo.study.evaluation import ResultsLog, summarize

ENGINE = ["--threads", "1", "--image-max-tokens", "256"]


def _prefix(size: int = 64, fill: int = 7) -> Prefix:
    return Prefix(bytes([fill]) * size, 12, ((3, 7, 9),), 5, 9, "m", (42,))


# -- the cache's own logic ------------------------------------------------------
def test_digest_separates_parts_and_types():
    assert digest("ab", "c") != digest("a", "bc")  # lengths are part of the key
    assert digest(b"x") != digest("x")
    assert digest([1, 2], {"a": 1}) == digest([1, 2], {"a": 1})


def test_disk_round_trip_is_private(tmp_path: Path):
    store = DiskPrefixes(tmp_path / "kv")
    store.put("k1", _prefix())
    assert store.get("k1") == _prefix()
    assert stat.S_IMODE((tmp_path / "kv").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "kv" / "k1.kv").stat().st_mode) == 0o600
    assert store.get("k2") is None


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda data: data[: len(data) - 10], "truncated"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "one state byte flipped"),
        (lambda data: b"NOTOURS!" + data[8:], "another program's file"),
        (lambda data: b"", "empty"),
        (lambda data: data.replace(b'"n_past": 12', b'"n_past": 1x'), "metadata that does not parse"),
    ],
)
def test_a_corrupt_file_is_ignored_and_removed(tmp_path: Path, damage, why):
    store = DiskPrefixes(tmp_path)
    store.put("k", _prefix())
    path = tmp_path / "k.kv"
    path.write_bytes(damage(path.read_bytes()))
    assert store.get("k") is None, why
    assert not path.exists()


def test_a_file_under_another_key_is_never_restored(tmp_path: Path):
    store = DiskPrefixes(tmp_path)
    store.put("image-a", _prefix(fill=1))
    os.replace(tmp_path / "image-a.kv", tmp_path / "image-b.kv")  # renamed: not what b's key wrote
    assert store.get("image-b") is None


def test_states_are_not_kept_where_others_may_write(tmp_path: Path):
    shared = tmp_path / "kv"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    DiskPrefixes(shared).put("k", _prefix())
    assert list(shared.iterdir()) == []


def test_disk_keeps_the_most_recently_used_within_its_bound(tmp_path: Path):
    store = DiskPrefixes(tmp_path)
    store.put("a", _prefix(1000))
    store.max_bytes = int(2.5 * (tmp_path / "a.kv").stat().st_size)
    store.put("b", _prefix(1000))
    for i, key in enumerate(["a", "b"]):
        os.utime(tmp_path / f"{key}.kv", (1000 + i, 1000 + i))
    assert store.get("a") is not None  # used: now the most recent
    store.put("c", _prefix(1000))
    assert sorted(p.stem for p in tmp_path.glob("*.kv")) == ["a", "c"]
    assert store.clear() > 0 and not list(tmp_path.glob("*.kv"))


def test_memory_cache_is_bounded_and_falls_back_to_disk(tmp_path: Path):
    cache = PrefixCache(max_bytes=150, disk=DiskPrefixes(tmp_path))
    cache.put("a", _prefix(100))
    cache.put("b", _prefix(100))  # a leaves memory, stays on disk
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == 100
    assert cache.get("a") == _prefix(100)
    assert cache.stats()["hits"] == 1
    assert PrefixCache(max_bytes=0).get("a") is None
    off = PrefixCache(max_bytes=0)
    off.put("a", _prefix())
    assert off.get("a") is None and off.stats()["entries"] == 0


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4G", 4 << 30), ("512M", 512 << 20), ("1.5GB", 3 << 29), ("800MiB", 800 << 20), ("100", 100)],
)
def test_parse_size(text, size):
    assert parse_size(text, "--cache-images") == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "4X", "inf"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="cannot read the size"):
        parse_size(text, "--cache-images")


# -- through llama.cpp, on every family -------------------------------------------
@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, VisionLanguageModel]:
    folder = tmp_path_factory.mktemp("cache-families")
    models = {}
    for name in sorted(FAMILIES):
        files = _build(folder, name)
        models[name] = VisionLanguageModel(
            files.model, files.mmproj, EngineSettings(n_ctx=2048, n_threads=2), name=name
        )
    return models


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_restored_prefix_gives_a_fresh_runs_logits(family_models, name, tmp_path):
    model = family_models[name]
    image, other = synthetic_image(160, 120, seed=1), synthetic_image(160, 120, seed=2)
    first = model.render_prompt("Which colour is the sky?", image=True)
    second = model.render_prompt("How many birds are there?", image=True)

    def logits(prompt, img, cache):
        session = model.session()
        session.prefill(prompt, img, cache=cache)
        return session, session.logits()

    cache = PrefixCache(disk=DiskPrefixes(tmp_path))
    _, _ = logits(first, image, cache)  # keeps the prefix
    restored, reused = logits(second, image, cache)
    fresh_session, fresh = logits(second, image, None)
    assert restored.n_cached_tokens > 0 and fresh_session.n_cached_tokens == 0
    assert restored.times.get("encode") == 0 and fresh_session.times.get("encode") > 0
    assert (restored.n_past, restored.n_kv) == (fresh_session.n_past, fresh_session.n_kv)
    assert restored.n_image_tokens == fresh_session.n_image_tokens
    assert np.abs(reused - fresh).max() < 1e-4
    # Negative control: the same question about another image: other logits, no reuse.
    other_session, about_other = logits(second, other, cache)
    assert other_session.n_cached_tokens == 0
    assert np.abs(about_other - fresh).max() > 0.1
    # A new process: an empty memory over the same folder restores the same state.
    again, from_disk = logits(second, image, PrefixCache(disk=DiskPrefixes(tmp_path)))
    assert again.n_cached_tokens == restored.n_cached_tokens
    assert np.abs(from_disk - fresh).max() < 1e-4


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_answer_and_probability_with_and_without_the_cache(family_models, name):
    model = family_models[name]
    agent = Agent(model, prefix_cache=PrefixCache())
    image = synthetic_image(120, 90, seed=5)
    results = {}
    for label, cached in (("without", False), ("keeps", True), ("restores", True)):
        question = make_question("Is the sky blue? Answer yes or no.", image, "auto")
        options = AskOptions(mode="large", image_cache=cached)
        results[label] = ask(question, options, large=agent).large
    assert results["without"].tokens["cached"] == results["keeps"].tokens["cached"] == 0
    assert results["restores"].tokens["cached"] > 0
    assert results["restores"].timings_ms["encode"] == 0
    for label in ("keeps", "restores"):
        assert results[label].answer == results["without"].answer
        assert results[label].answer_probability == pytest.approx(
            results["without"].answer_probability, abs=1e-5
        )
    assert agent.prefix_cache.stats()["entries"] == 1


def test_a_prompt_that_ends_with_its_image_is_not_cached(family_models):
    model = family_models["gemma3"]
    cache = PrefixCache()
    prompt = model.render_prompt("Look.", image=True)
    head = prompt.split(model.marker)[0] + model.marker  # nothing after the image
    session = model.session()
    session.prefill(head, synthetic_image(64, 64, seed=1), cache=cache)
    assert cache.stats()["entries"] == 0


# -- the command line ---------------------------------------------------------------
@pytest.fixture
def pair_args(small_files, large_files) -> list[str]:
    return [
        "--small", str(small_files.model), "--small-mmproj", str(small_files.mmproj),
        "--large", str(large_files.model), "--large-mmproj", str(large_files.mmproj),
    ]  # fmt: skip


def _asks(args: list[str], env: dict[str, str], stdin: bytes | None = None) -> list[dict]:
    out = run_cli(["ask", *args, *ENGINE, "--think-budget", "16", "--json", "--no-server"], env, stdin)
    assert out.returncode == 0, out.stderr.decode()
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


def test_a_second_process_restores_the_image_from_disk(isolated_env, pair_args, image_file):
    first = _asks([str(image_file), "Is there a red circle?", *pair_args], isolated_env)[0]
    second = _asks([str(image_file), "How many squares are there?", *pair_args], isolated_env)[0]
    for role in ("small", "large"):
        assert first[role]["tokens"]["cached"] == 0 and first[role]["timings_ms"]["encode"] > 0
        assert second[role]["tokens"]["cached"] > 0, role
        assert second[role]["timings_ms"]["encode"] == 0
        assert second[role]["tokens"]["image"] == first[role]["tokens"]["image"]
        assert "restore" in second[role]["timings_ms"]
    kv = Path(isolated_env["VLMDUO_CACHE"]) / "kv"
    assert stat.S_IMODE(kv.stat().st_mode) == 0o700 and len(list(kv.glob("*.kv"))) == 2
    listed = json.loads(run_cli(["cache", "--json"], isolated_env).stdout)
    assert len(listed["models"]) == 2 and all(m["images"] == 1 for m in listed["models"].values())
    assert listed["bytes"] == sum(p.stat().st_size for p in kv.glob("*.kv"))
    # A corrupt file is ignored (the image encoded again) and rebuilt.
    for path in kv.glob("*.kv"):
        path.write_bytes(path.read_bytes()[:100])
    third = _asks([str(image_file), "Is it round?", *pair_args], isolated_env)[0]
    assert third["large"]["tokens"]["cached"] == 0 and third["large"]["timings_ms"]["encode"] > 0
    assert all(p.stat().st_size > 100 for p in kv.glob("*.kv"))
    cleared = run_cli(["cache", "--clear"], isolated_env)
    assert cleared.returncode == 0 and "Cleared" in cleared.stderr.decode()
    assert not list(kv.glob("*.kv"))


def test_no_image_cache_neither_reuses_nor_keeps(isolated_env, pair_args, image_file):
    _asks([str(image_file), "Is there a red circle?", *pair_args], isolated_env)
    off = _asks([str(image_file), "Is it round?", *pair_args, "--no-image-cache"], isolated_env)[0]
    assert off["large"]["tokens"]["cached"] == 0 and off["large"]["timings_ms"]["encode"] > 0
    kv = Path(isolated_env["VLMDUO_CACHE"]) / "kv"
    for path in kv.glob("*.kv"):
        path.unlink()
    _asks([str(image_file), "Is it round?", *pair_args, "--no-image-cache", "--mode", "large"], isolated_env)
    assert not list(kv.glob("*.kv"))
    table = run_cli(["ask", str(image_file), "Is it round?", *pair_args, *ENGINE, "--mode", "large",
                     "--no-server", "--no-image-cache"], isolated_env)  # fmt: skip
    rows = [line.split()[0] for line in table.stderr.decode().splitlines() if line.strip()]
    assert "encode" in rows and "restore" not in rows and "cached" not in rows


def test_several_questions_pay_for_the_image_once(isolated_env, pair_args, image_file):
    questions = ["Is there a red circle?", "How many squares are there?", "Which colour is the sky?"]
    lines = _asks(["-", *questions, *pair_args, "--mode", "large"], isolated_env, image_file.read_bytes())
    assert len(lines) == 3
    assert [line["format"] for line in lines] == ["yesno", "number", "short"]
    assert lines[0]["large"]["timings_ms"]["encode"] > 0
    assert all(line["large"]["tokens"]["cached"] > 0 for line in lines[1:])
    assert all(line["large"]["timings_ms"]["encode"] == 0 for line in lines[1:])
    plain = run_cli(
        ["ask", str(image_file), *questions[:2], *pair_args, *ENGINE, "--mode", "large", "--no-server"],
        isolated_env,
    )
    assert plain.returncode == 0 and len(plain.stdout.decode().splitlines()) == 2
    # Both restored (from the disk, after the run above): a restore row and the tokens it held.
    rows = [line.split()[0] for line in plain.stderr.decode().splitlines() if line.strip()]
    assert rows.count("restore") == 2 and rows.count("cached") == 2 and rows.count("encode") == 2


def test_several_questions_with_each_are_refused(isolated_env, pair_args, tmp_path):
    for questions in (["Q1", "Q2"], ["Q1", "Q2", "Q3"]):
        out = run_cli(["ask", "--each", str(tmp_path), *questions, *pair_args], isolated_env)
        assert out.returncode == 2 and "QUESTION" in out.stderr.decode().splitlines()[0]


# -- CircularEval ---------------------------------------------------------------------
def _item(options: dict[str, str], answer: str) -> EvalItem:
    return EvalItem("7", "Which?", options, answer, None, None, "/x.png", None)


@pytest.mark.parametrize(
    ("options", "answer", "expected"),
    [
        ({"A": "cat", "B": "dog", "C": "bird"}, "B",
         [("7", {"A": "cat", "B": "dog", "C": "bird"}, "B"),
          ("7@1", {"A": "dog", "B": "bird", "C": "cat"}, "A"),
          ("7@2", {"A": "bird", "B": "cat", "C": "dog"}, "C")]),
        ({"A": "yes", "B": "no"}, "A",
         [("7", {"A": "yes", "B": "no"}, "A"), ("7@1", {"A": "no", "B": "yes"}, "B")]),
        ({}, "three", [("7", {}, "three")]),
    ],
)  # fmt: skip
def test_rotations(options, answer, expected):
    passes = rotations(_item(options, answer))
    assert [(p.id, p.options, p.answer) for p in passes] == expected
    for p in passes:  # the right text stays right
        assert p.options.get(p.answer, p.answer) == options.get(answer, answer)


def test_circular_score_needs_every_pass():
    def rec(item, rotation, correct, of="1", n=2):
        return {"config": "large", "item_id": item, "correct": correct, "circular_of": of,
                "rotation": rotation, "rotations": n}  # fmt: skip

    records = [
        rec("1", 0, True), rec("1@1", 1, True),  # right both times
        rec("2", 0, True, "2"), rec("2@1", 1, False, "2"),  # right once: wrong
        rec("3", 0, True, "3"),  # a pass missing: wrong
    ]  # fmt: skip
    [summary] = summarize(records)
    assert summary.accuracy == 1.0 and summary.n == 3  # the first passes
    assert summary.circular.n == 3 and summary.circular.n_correct == 1
    [plain] = summarize(
        [{k: v for k, v in r.items() if k in ("config", "item_id", "correct")} for r in records]
    )
    assert plain.circular is None


def test_circular_eval_reuses_each_image(small_model, large_model, tmp_path):
    dataset = load_dataset(write_mmbench(tmp_path / "mm.tsv"))
    cache = PrefixCache()
    large = Agent(large_model, prefix_cache=cache)
    log = ResultsLog(tmp_path / "results.jsonl")
    outcome = run_eval(dataset, expand_configs(["large"], [], []), log, small=None, large=large,
                       options=TINY, circular=True)  # fmt: skip
    records = list(log.records())
    # 3 items of 4, 2 and 3 options (one image does not decode: one record, an error)
    assert sorted(r["item_id"] for r in records) == sorted(
        ["10", "10@1", "10@2", "10@3", "11", "11@1", "12", "12@1", "12@2", "13", "13@1"]
    )
    [summary] = outcome.summaries
    assert summary.n == 4 and summary.circular is not None and summary.circular.n == 4
    assert summary.circular.n_correct <= summary.n_correct
    # 9 asks about 3 images that decode: each image encoded once, reused 6 times
    assert cache.stats()["entries"] == 3 and cache.stats()["hits"] == 6
    plain = run_eval(dataset, expand_configs(["large"], [], []), ResultsLog(tmp_path / "plain.jsonl"),
                     small=None, large=large, options=dataclasses.replace(TINY))  # fmt: skip
    assert plain.summaries[0].circular is None
    assert plain.summaries[0].accuracy == summary.accuracy


def test_eval_circular_on_the_command_line(isolated_env, pair_args, tmp_path):
    path = write_mmbench(tmp_path / "mm.tsv")
    results = str(tmp_path / "r.jsonl")
    out = run_cli(
        ["eval", str(path), "--modes", "large", "--circular", "--json", "--results", results,
         *pair_args, *ENGINE],
        isolated_env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    [summary] = json.loads(out.stdout)["summaries"]
    assert summary["circular"]["n"] == 4
    table = run_cli(
        ["eval", str(path), "--modes", "large", "--circular", "--resume", "--results", results,
         *pair_args, *ENGINE],
        isolated_env,
    )  # fmt: skip
    assert "circular" in table.stderr.decode()
