"""The registry loader: the shipped file, the user's file merged over it, validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlmduo.errors import RegistryError, UnknownModelError
from vlmduo.models.registry import (
    DEFAULT_PAIR,
    load_registry,
    parse_registry_file,
    shipped_registry_path,
    vlmduo_home,
)

HUB_ENTRY = """
[models.mine]
repo = "me/mine-GGUF"
file = "mine-Q4_K_M.gguf"
mmproj = "mmproj-mine.gguf"
"""


def write(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the shipped file ----------------------------------------------------------------


def test_shipped_registry_loads_with_the_papers_default_pair(tmp_path: Path) -> None:
    registry = load_registry(tmp_path)  # no user file there
    small, large = registry.pair_models(DEFAULT_PAIR)
    assert (small.name, large.name) == ("qwen3-vl-2b-thinking", "qwen3-vl-8b-instruct")
    assert small.thinking and small.role == "small" and small.is_hub
    assert not large.thinking and large.role == "large"
    assert registry.files == (shipped_registry_path(),)


def test_every_shipped_hub_entry_is_complete_and_says_whether_verified(tmp_path: Path) -> None:
    registry = load_registry(tmp_path)
    hub_entries = [e for e in registry.models.values() if e.is_hub]
    assert len(hub_entries) >= 10
    for entry in hub_entries:
        assert entry.repo and entry.file and entry.mmproj, entry.name
        assert entry.file.endswith(".gguf") and entry.mmproj.endswith(".gguf"), entry.name
        assert entry.size_gb and entry.memory_gb, entry.name
        assert entry.role in ("small", "large", "either"), entry.name
    text = shipped_registry_path().read_text()
    for name in (e.name for e in hub_entries):
        # Each entry's block carries a comment saying how (or whether) it was verified.
        header = re.search(rf'^\[models\.("?){re.escape(name)}\1\]$', text, re.M)
        assert header, name
        block = text[header.end() :].split("\n[", 1)[0]
        assert re.search(r"#.*[Vv]erified", block), name
        assert re.search(r"^verified = (true|false)$", block, re.M), name


def test_shipped_synthetic_entries_and_pair(tmp_path: Path) -> None:
    registry = load_registry(tmp_path)
    small, large = registry.pair_models("synthetic")
    assert small.source == large.source == "synthetic"
    assert small.synthetic is not None and small.synthetic["n_embd"] == 128
    assert large.synthetic is not None and large.synthetic["n_layer"] == 4
    assert small.thinking and not large.thinking


def test_vlmduo_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLMDUO_HOME", str(tmp_path / "h"))
    assert vlmduo_home() == tmp_path / "h"
    monkeypatch.delenv("VLMDUO_HOME")
    assert vlmduo_home() == Path.home() / ".config" / "vlmduo"


# --- merging -------------------------------------------------------------------------


def test_user_file_adds_entries_and_pairs(tmp_path: Path) -> None:
    write(tmp_path, HUB_ENTRY + '[pairs.mixed-mine]\nsmall = "qwen3-vl-2b-thinking"\nlarge = "mine"\n')
    registry = load_registry(tmp_path)
    mine = registry.model("mine")
    assert (mine.source, mine.repo, mine.origin) == ("hub", "me/mine-GGUF", tmp_path / "models.toml")
    assert registry.pair("mixed-mine").large == "mine"
    assert "qwen3-vl-8b-instruct" in registry.models  # shipped entries stay


def test_user_entry_replaces_the_shipped_one_as_a_whole(tmp_path: Path) -> None:
    write(
        tmp_path,
        '[models.qwen3-vl-8b-instruct]\nrepo = "me/other-GGUF"\nfile = "a.gguf"\nmmproj = "b.gguf"\n',
    )
    entry = load_registry(tmp_path).model("qwen3-vl-8b-instruct")
    assert (entry.repo, entry.file, entry.mmproj) == ("me/other-GGUF", "a.gguf", "b.gguf")
    # Nothing is inherited from the shipped entry it replaced.
    assert entry.role == "either" and entry.size_gb is None and entry.family is None


def test_user_pair_can_replace_the_default(tmp_path: Path) -> None:
    write(tmp_path, '[pairs.default]\nsmall = "synthetic-small"\nlarge = "synthetic-large"\n')
    assert load_registry(tmp_path).pair("default").small == "synthetic-small"


def test_local_entry_paths_are_relative_to_their_file(tmp_path: Path) -> None:
    write(tmp_path, '[models.here]\npath = "weights/m.gguf"\nmmproj = "~/p.gguf"\nthinking = true\n')
    entry = load_registry(tmp_path).model("here")
    assert entry.source == "local"
    assert entry.path == tmp_path / "weights" / "m.gguf"
    assert entry.mmproj_path == Path.home() / "p.gguf"
    assert entry.repo is None and entry.thinking


def test_defaults_and_pins(tmp_path: Path) -> None:
    pin = "AB" * 32
    write(tmp_path, HUB_ENTRY + f'revision = "{"c" * 40}"\nsha256 = "{pin}"\nthink_end = "</t>"\n')
    entry = load_registry(tmp_path).model("mine")
    assert entry.sha256 == pin.lower() and entry.mmproj_sha256 is None
    assert entry.revision == "c" * 40
    assert (entry.think_start, entry.think_end, entry.verified) == ("<think>", "</t>", False)


# --- validation: one line naming the file and the entry ------------------------------

BAD_ENTRIES = [
    pytest.param(HUB_ENTRY + 'fil = "x"\n', "unknown key 'fil' (did you mean 'file'?)", id="unknown-key"),
    pytest.param(HUB_ENTRY + 'path = "/x.gguf"\n', "both 'repo' (Hub) and 'path'", id="repo-and-path"),
    pytest.param("[models.mine]\nthinking = true\n", "needs 'repo'", id="no-source"),
    pytest.param('[models.mine]\nrepo = "me/x"\nfile = "a.gguf"\n', "needs 'mmproj'", id="no-mmproj"),
    pytest.param('[models.mine]\npath = "/a.gguf"\n', "needs 'mmproj'", id="local-no-mmproj"),
    pytest.param(HUB_ENTRY.replace("me/mine-GGUF", "mine"), "form 'owner/name'", id="bad-repo"),
    pytest.param(HUB_ENTRY + "thinking = 1\n", "thinking must be true or false", id="bool-type"),
    pytest.param(HUB_ENTRY + 'size_gb = "2"\n', "size_gb must be a non-negative number", id="num-type"),
    pytest.param(HUB_ENTRY + "size_gb = true\n", "size_gb must be a non-negative number", id="bool-num"),
    pytest.param(HUB_ENTRY + 'role = "huge"\n', "role must be one of", id="role"),
    pytest.param(HUB_ENTRY + 'sha256 = "abc"\n', "sha256 must be 64 hexadecimal", id="sha"),
    pytest.param(HUB_ENTRY + 'repo2 = ""\n', "unknown key 'repo2'", id="unknown-key-2"),
    pytest.param(HUB_ENTRY.replace("mine-Q4", "../mine-Q4"), "inside the repo", id="escape"),
    pytest.param("[models.mine]\nsynthetic = { n = [1] }\n", "numbers, strings and booleans", id="synthetic"),
    pytest.param(
        '[models.mine]\nsynthetic = { family = "nope" }\n', "no fixture builder", id="synthetic-family"
    ),
    pytest.param(
        '[models.mine]\npath = "/a"\nmmproj = "/b"\nsha256 = "' + "a" * 64 + '"\n',
        "'sha256' does not apply to a local entry",
        id="local-pin",
    ),
    pytest.param('[models.qwen2.5-x]\nrepo = "a/b"\n', "names with dots need quotes", id="dotted"),
    pytest.param('[models."bad name"]\nrepo = "a/b"\n', "names may use only", id="name"),
    pytest.param('[model.mine]\nrepo = "a/b"\n', "unknown table (did you mean 'models'?)", id="top"),
    pytest.param('[pairs.p]\nsmall = "synthetic-small"\n', "needs 'large'", id="pair-half"),
    pytest.param(
        '[pairs.p]\nsmall = "synthetic-small"\nlarge = "nope"\n', "names no model", id="pair-missing-model"
    ),
    pytest.param('[pairs.p]\nsmall = "a"\nlarge = "b"\nextra = 1\n', "unknown key 'extra'", id="pair-key"),
    pytest.param("[models.mine\n", "invalid TOML", id="toml"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_ENTRIES)
def test_bad_entries_are_reported_with_file_and_name(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RegistryError) as caught:
        load_registry(tmp_path)
    message = caught.value.message
    assert expected in message
    assert str(path) in message and "\n" not in message
    assert caught.value.hint == f"edit {path}"


def test_entry_name_appears_in_the_error(tmp_path: Path) -> None:
    write(tmp_path, HUB_ENTRY + "verified = 3\n")
    with pytest.raises(RegistryError, match=r"\[models\.mine\] verified must be true or false"):
        load_registry(tmp_path)


def test_parse_registry_file_reads_one_file(tmp_path: Path) -> None:
    models, pairs = parse_registry_file(write(tmp_path, HUB_ENTRY))
    assert list(models) == ["mine"] and pairs == {}


# --- unknown names -------------------------------------------------------------------

UNKNOWN = [
    ("qwen3-vl-8b-instrct", "qwen3-vl-8b-instruct"),
    ("qwen3-vl-2b", "qwen3-vl-2b-thinking"),
    ("gemma", "gemma-3-4b"),
    ("synthetic", "synthetic-small"),
]


@pytest.mark.parametrize(("name", "suggested"), UNKNOWN)
def test_unknown_model_suggests_the_closest_names(tmp_path: Path, name: str, suggested: str) -> None:
    with pytest.raises(UnknownModelError) as caught:
        load_registry(tmp_path).model(name)
    assert f"unknown model '{name}'" in caught.value.message
    assert suggested in caught.value.message
    assert caught.value.hint == "run: vlmduo models"


def test_unknown_name_without_any_close_match(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError) as caught:
        load_registry(tmp_path).model("zzzz")
    assert caught.value.message == "unknown model 'zzzz'"


def test_unknown_pair(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"unknown pair 'defualt'; did you mean default"):
        load_registry(tmp_path).pair("defualt")
