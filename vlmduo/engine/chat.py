"""Render a prompt with the chat template that ships inside the GGUF.

The image is passed as libmtmd's media marker inside the user's text. libmtmd
wraps it in the model's own image tokens (``<|vision_start|>`` for Qwen,
``<start_of_image>`` for Gemma, ...). Templates differ in the content they
take: some only strings (SmolLM2's ChatML), some only typed parts, and some
(SmolVLM2's) accept a string and silently drop it. So, as llama.cpp does
(common/jinja/caps.cpp), a render counts only when its output holds the
question and the marker; otherwise the same text goes in as one text part.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from datetime import datetime
from typing import Any

from vlmduo.errors import ModelError

# Used when a GGUF has no template at all (old conversions).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise ValueError(message)


# Hugging Face renders chat templates with these options and loopcontrols
# ({% break %}/{% continue %}), which some published templates use.
_OPTIONS: dict[str, Any] = {
    "trim_blocks": True,
    "lstrip_blocks": True,
    "extensions": ["jinja2.ext.loopcontrols"],
}


def _environment(name: str, source: str) -> Any:
    """A sandboxed environment whose one template, ``name``, is ``source``; its compiled
    code cached on disk by jinja2 (which also checks the source's checksum). A template
    that includes or extends another gets jinja2's "not found", as with no loader."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        **_OPTIONS,
        loader=jinja2.FunctionLoader(lambda asked: (source, None, lambda: True) if asked == name else None),
        bytecode_cache=_bytecode_cache(),
        auto_reload=False,
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.cache
def _bytecode_cache() -> Any:
    """jinja2's file cache of compiled templates in ``<vlmduo cache>/jinja``, or None
    where that cannot be made. Compiling a published template takes 20-60 ms, paid by
    every ``vlmduo ask`` process; loading its cached code takes under 1 ms."""
    import jinja2

    from vlmduo.paths import cache_dir

    class QuietCache(jinja2.FileSystemBytecodeCache):
        def dump_bytecode(self, bucket: Any) -> None:
            with contextlib.suppress(OSError):  # a full or read-only disk costs only speed
                super().dump_bytecode(bucket)

    directory = os.path.join(cache_dir(), "jinja")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _private(os.stat(directory)):
            return None  # cached code is run: never from a folder others can write
    except OSError:
        return None
    return QuietCache(directory)


def _private(st: os.stat_result) -> bool:
    """True for a folder this user owns that nobody else can write to."""
    owner = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return owner and not st.st_mode & 0o022


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    """The compiled template, once per text and process (a compiled template renders
    from any thread)."""
    import jinja2

    # The key holds what changes the compiled code beside the text: options, version.
    salt = f"{jinja2.__version__} {sorted(_OPTIONS.items())!r}\n"
    name = hashlib.sha256(salt.encode() + template.encode()).hexdigest()
    try:
        return _environment(name, template).get_template(name)
    except Exception as exc:
        raise ModelError(f"the model's chat template does not parse: {exc}") from exc


def render(
    template: str | None,
    user_text: str,
    *,
    media_marker: str | None = None,
    system: str | None = None,
    bos_token: str = "",
    eos_token: str = "",
    enable_thinking: bool | None = None,
) -> str:
    """The prompt text up to and including the assistant's turn opening.

    With ``media_marker`` the user's turn starts with it (the image), then the text.
    """
    compiled = _compile(template or FALLBACK_TEMPLATE)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = f"{media_marker}\n{user_text}" if media_marker else user_text
    must_hold = [part for part in (user_text.strip(), media_marker) if part]
    failure = "it dropped the question"
    for as_parts in (False, True):
        messages = _messages(text, system, as_parts)
        try:
            out = compiled.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=bos_token,
                eos_token=eos_token,
                **extra,
            )
        except Exception as exc:  # a template may reject one content shape
            failure = str(exc)
            continue
        if all(part in out for part in must_hold):
            return out
    raise ModelError(f"the model's chat template failed to render: {failure}")


def _messages(user_text: str, system: str | None, as_parts: bool) -> list[dict[str, Any]]:
    content: Any = [{"type": "text", "text": user_text}] if as_parts else user_text
    messages: list[dict[str, Any]] = []
    if system:
        sys_content: Any = [{"type": "text", "text": system}] if as_parts else system
        messages.append({"role": "system", "content": sys_content})
    messages.append({"role": "user", "content": content})
    return messages
