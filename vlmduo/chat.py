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

import functools
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


def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Hugging Face renders chat templates with these options and loopcontrols
    # ({% break %}/{% continue %}), which some published templates use.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    """The compiled template, once per text: compiling a published template took
    ~57 ms, paid on every prompt before (a compiled template renders from any thread)."""
    try:
        return _environment().from_string(template)
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
