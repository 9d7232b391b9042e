"""Chat templates: compiled code cached on disk, so a process does not compile again."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmduo.engine import chat
from vlmduo.errors import ModelError

TEMPLATES = Path(chat.__file__).parent.parent / "models" / "fixtures" / "templates"


def _new_process() -> None:
    """Forget what this process compiled and which cache folder it chose."""
    chat._compile.cache_clear()
    chat._bytecode_cache.cache_clear()


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A new process's view: no compiled template in memory, the cache under tmp_path."""
    monkeypatch.setenv("VLMDUO_CACHE", str(tmp_path / "cache"))
    _new_process()
    yield tmp_path / "cache" / "jinja"
    _new_process()


def _refuse_to_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import jinja2

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("compiled")

    monkeypatch.setattr(jinja2.Environment, "compile", refuse)


def test_a_second_process_loads_the_compiled_template(fresh_cache, monkeypatch):
    template = (TEMPLATES / "qwen3-vl-instruct.jinja").read_text()
    first = chat.render(template, "How many cats?", media_marker="<__media__>")
    assert len(list(fresh_cache.iterdir())) == 1

    chat._compile.cache_clear()  # as in the next process
    _refuse_to_compile(monkeypatch)
    assert chat.render(template, "How many cats?", media_marker="<__media__>") == first
    # Negative control: another template is not in the cache, so it must compile.
    with pytest.raises(Exception, match="compiled"):
        chat.render(template + " ", "How many cats?")


def test_an_unwritable_cache_costs_only_speed(fresh_cache, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("VLMDUO_CACHE", str(blocker))
    out = chat.render((TEMPLATES / "smolvlm2.jinja").read_text(), "What is it?", media_marker="<image>")
    assert "What is it?" in out and "<image>" in out


def test_a_cache_folder_others_can_write_is_not_used(fresh_cache):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(0o777)  # cached code is run: never from here
    out = chat.render((TEMPLATES / "smolvlm2.jinja").read_text(), "What is it?", media_marker="<image>")
    assert "What is it?" in out
    assert list(fresh_cache.iterdir()) == []
    # Negative control: the same folder, private, is used.
    fresh_cache.chmod(0o700)
    _new_process()
    chat.render((TEMPLATES / "smolvlm2.jinja").read_text(), "What is it?", media_marker="<image>")
    assert len(list(fresh_cache.iterdir())) == 1


def test_a_template_cannot_include_another(fresh_cache):
    # A GGUF's template is untrusted text: it names no other file that can be read.
    with pytest.raises(ModelError, match="failed to render: other$"):  # jinja2: not found
        chat.render('{% include "other" %}{{ messages[0].content }}', "What is it?")
