"""What travels between ``vlmduo ask`` and a server: the native request and the result.

``POST /api/ask`` takes ``{"question", "image", "options", "engine"}`` and returns
exactly the ``ask --json`` object. ``image`` is null, a base64 data URI or (when the
server allows it) an http(s) URL, as in OpenAI's ``image_url``, or
``{"data": base64, "name": ..., "read_ms": ...}``: the encoded bytes ``vlmduo ask``
read itself, with the name its messages use, so an error reads the same as in-process.
``options`` are :class:`~vlmduo.duo.pipeline.AskOptions` fields; ``engine``, when given,
must equal the server's engine settings (409 otherwise). The server's side of it
(validation, image decoding under its caps) is in ``vlmduo.serve.inputs``; this
module stays light, for the client.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmduo.duo.pipeline import AskOptions, AskResult


class BadCall(ValueError):
    """A request body that is not a thin client's call (``POST /api/cli/ask``): 400."""


@dataclass(frozen=True)
class Limits:
    """A server's caps on what a request may carry."""

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 64_000_000  # load_image's own cap, so errors match in-process
    allow_url_images: bool = False

    def to_json(self) -> dict[str, int]:
        """The limits as a server record carries them."""
        return {k: int(v) for k, v in dataclasses.asdict(self).items()}


def native_request(
    question: str,
    image: bytes | None,
    image_name: str,
    read_ms: float,
    options: AskOptions,
    engine: dict[str, int],
) -> dict[str, Any]:
    """The body ``vlmduo ask`` sends."""
    encoded = None
    if image is not None:
        encoded = {"data": base64.b64encode(image).decode("ascii"), "name": image_name, "read_ms": read_ms}
    return {"question": question, "image": encoded, "options": dataclasses.asdict(options), "engine": engine}


def result_from_json(data: dict[str, Any]) -> AskResult:
    """Rebuild an :class:`AskResult` from its ``--json`` object (``to_json`` gives it back)."""
    from vlmduo.agents.base import AgentResult
    from vlmduo.duo.pipeline import AskResult

    def agent(value: dict[str, Any] | None) -> AgentResult | None:
        if value is None:
            return None
        result = AgentResult(
            model=value["model"],
            answer=value["answer"],
            reasoning=value["reasoning"],
            tokens=value["tokens"],
            timings_ms=value["timings_ms"],
            answer_probability=value.get("answer_probability"),
            cancelled=value.get("cancelled", False),
            reasoning_truncated=value.get("reasoning_truncated"),
            threads=value.get("threads") or {},
        )
        if value.get("sampling") is not None:
            result.sampling = value["sampling"]
        return result

    return AskResult(
        answer=data["answer"],
        mode=data["mode"],
        policy=data["policy"],
        route=data["route"],
        format=data["format"],
        small=agent(data["small"]),
        large=agent(data["large"]),
        transferred=data["transferred"],
        timings_ms=data["timings_ms"],
    )
