"""The server's side of a request: validating the native body, decoding images under caps.

Image forms (both endpoints): a base64 data URI; an http(s) URL, fetched only when
the server allows it; or, from ``vlmduo ask``, ``{"data", "name", "read_ms"}``.
Local paths are never read. An oversized image is 413; anything else wrong, 400.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmduo.serve.openai_api import ApiError, ask_options, option_fields
from vlmduo.serve.wire import Limits

if TYPE_CHECKING:
    from vlmduo.duo.pipeline import AskOptions
    from vlmduo.media.images import LoadedImage


@dataclass(frozen=True)
class NativeRequest:
    """A parsed ``POST /api/ask`` body."""

    question: str
    image: Any
    options: AskOptions
    engine: dict[str, int] | None


def parse_native(body: dict[str, Any]) -> NativeRequest:
    """Validate a native request; ApiError 400 on a mistake."""

    question = body.get("question")
    if not isinstance(question, str):
        raise ApiError(400, "question must be a string", param="question")
    options = ask_options(option_fields(body.get("options"), "options"))
    engine = body.get("engine")
    if engine is not None and not isinstance(engine, dict):
        raise ApiError(400, "engine must be an object", param="engine")
    return NativeRequest(question, body.get("image"), options, engine)


def decode_image(spec: Any, limits: Limits) -> LoadedImage | None:
    """The image of a request (see the module's docstring for the forms), decoded with
    the caps of ``limits``: 413 for an oversized image, 400 for anything else wrong."""
    from vlmduo.errors import ImageError
    from vlmduo.media import images

    if spec is None:
        return None
    if isinstance(spec, dict):
        data, name = _b64(spec.get("data"), limits), spec.get("name")
        read_ms = spec.get("read_ms") or 0.0
        if not isinstance(name, str) or not isinstance(read_ms, int | float):
            raise ApiError(400, "image needs a name and read_ms", param="image")
    elif isinstance(spec, str) and spec.startswith("data:"):
        data, name, read_ms = _data_uri(spec, limits), "image_url", 0.0
    elif isinstance(spec, str) and spec.split(":", 1)[0].lower() in ("http", "https"):
        if not limits.allow_url_images:
            raise ApiError(
                400,
                "this server does not fetch image URLs: send the image as a base64 data URI",
                param="image_url",
                code="url_images_disabled",
                hint="or start the server with --allow-url-images",
            )
        try:
            return images.load_image(spec, max_bytes=limits.max_image_bytes, max_pixels=limits.max_pixels)
        except ImageError as exc:
            raise _image_error(exc) from None
    else:
        raise ApiError(
            400,
            "images must be base64 data URIs (data:image/png;base64,...) or http(s) URLs; "
            "local paths are never read",
            param="image_url",
            code="invalid_image_url",
        )
    try:
        return images.decode_image_bytes(data, name, max_pixels=limits.max_pixels, read_ms=float(read_ms))
    except ImageError as exc:
        raise _image_error(exc) from None


def _image_error(exc: Exception) -> ApiError:
    message = getattr(exc, "message", str(exc))
    too_large = message.startswith(("image too large", "image download exceeds"))
    return ApiError(413 if too_large else 400, message, param="image_url", code="invalid_image")


def _too_large(size: int, limits: Limits) -> ApiError:
    return ApiError(
        413,
        f"image is {size / 2**20:.1f} MiB; this server takes at most "
        f"{limits.max_image_bytes / 2**20:g} MiB (--max-image-mb)",
        param="image_url",
        code="image_too_large",
    )


def _b64(text: Any, limits: Limits) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, "image data must be a base64 string", param="image_url")
    if len(text) * 3 // 4 > limits.max_image_bytes + 3:
        raise _too_large(len(text) * 3 // 4, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "image data is not valid base64", param="image_url", code="invalid_image"
        ) from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(len(data), limits)
    return data


def _data_uri(uri: str, limits: Limits) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(
            400,
            "a data URI must be base64: data:image/png;base64,...",
            param="image_url",
            code="invalid_image",
        )
    return _b64(payload, limits)
