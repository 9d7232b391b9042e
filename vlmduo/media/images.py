"""Image input: a path, an http(s) URL or ``-`` (stdin) becomes packed RGB888 pixels.

The engine hands the pixels to libmtmd's ``mtmd_bitmap_init``, which takes exactly
``width * height * 3`` bytes, row-major. Everything that can go wrong on the way
(missing file, not an image, truncated data, a decompression bomb, a failed
download) becomes one :class:`~vlmduo.errors.ImageError` line that names the source.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import stat
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from vlmduo.errors import ImageError, human_size, one_line

if TYPE_CHECKING:  # imported where used: reading bytes for a server needs neither
    from PIL import Image

STDIN = "-"
# The picture shipped with vlmduo (``vlmduo ask example``): three red circles, a blue
# square and a green triangle, so a first question has an answer anyone can check.
EXAMPLE_IMAGE = Path(__file__).resolve().with_name("example.png")
# "scheme://" marks a URL; a bare "C:/x.png" or "cat.png" is a path.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# What Pillow raises on broken data varies by plugin; these are the ones it uses.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


@dataclass(frozen=True)
class LoadedImage:
    """Decoded pixels ready for the vision encoder, plus where they came from."""

    rgb: bytes = field(repr=False)  # packed RGB888, row-major, width*height*3 bytes
    width: int
    height: int
    source: str  # what the user passed ("-" for stdin)
    decode_ms: float  # fetch/read + decode + EXIF transpose + RGB conversion

    @functools.cached_property
    def digest(self) -> str:
        """A digest of the pixels and size (an image cache key part), computed once."""
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{self.width}x{self.height}:".encode())
        h.update(self.rgb)
        return h.hexdigest()


def load_image(
    source: str,
    *,
    stdin: BinaryIO | None = None,
    timeout: float = 20.0,
    max_bytes: int = 50 * 2**20,
    max_pixels: int = 64_000_000,
) -> LoadedImage:
    """Read, decode and convert the image named by ``source`` to packed RGB888.

    ``source`` is a file path, an ``http://``/``https://`` URL, or ``"-"`` to read
    ``stdin`` (default: the process's binary stdin). ``timeout`` bounds each network
    operation and the whole download; ``max_bytes`` caps downloads and stdin;
    ``max_pixels`` caps width*height before any pixel is decoded (Pillow's own
    decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``, still applies on top).
    EXIF orientation is applied, animated images give their first frame and
    transparency is composited on white. Raises :class:`ImageError` on any failure.
    """
    start = time.perf_counter()
    if source == STDIN or _URL_RE.match(source):
        data = read_image_bytes(source, stdin=stdin, timeout=timeout, max_bytes=max_bytes)
        read_ms = (time.perf_counter() - start) * 1000.0
        return decode_image_bytes(data, source, max_pixels=max_pixels, read_ms=read_ms)
    # A file is decoded straight from disk (Pillow reads only what it needs).
    name = _display_name(source)
    width, height, rgb = _decode(_check_path(source, name), name, max_pixels)
    return LoadedImage(
        rgb=rgb,
        width=width,
        height=height,
        source=source,
        decode_ms=(time.perf_counter() - start) * 1000.0,
    )


def read_image_bytes(
    source: str,
    *,
    stdin: BinaryIO | None = None,
    timeout: float = 20.0,
    max_bytes: int = 50 * 2**20,
) -> bytes:
    """The encoded bytes of ``source`` (a path, an http(s) URL or ``-``), not decoded,
    with :func:`load_image`'s one-line errors for a source that cannot be read.

    ``vlmduo ask`` sends these bytes to a running server, which decodes them with
    :func:`decode_image_bytes` under the same name, so every message is the same as
    in-process. Needs neither Pillow nor numpy.
    """
    name = _display_name(source)
    if source == STDIN:
        return _read_stdin(stdin, max_bytes)
    if _URL_RE.match(source):
        from vlmduo.media import url  # urllib and http.client: 15 ms, for URLs only

        return url.fetch(source, timeout=timeout, max_bytes=max_bytes)
    path = _check_path(source, name)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _file_error(exc, name) from exc


def decode_image_bytes(
    data: bytes, source: str, *, max_pixels: int = 64_000_000, read_ms: float = 0.0
) -> LoadedImage:
    """Decode encoded image bytes exactly as :func:`load_image` decodes a file.

    ``source`` names the image in messages; ``read_ms``, the time it took to get the
    bytes, is added to ``decode_ms`` so the image stage counts all of it.
    """
    start = time.perf_counter()
    width, height, rgb = _decode(io.BytesIO(data), _display_name(source), max_pixels)
    return LoadedImage(
        rgb=rgb,
        width=width,
        height=height,
        source=source,
        decode_ms=read_ms + (time.perf_counter() - start) * 1000.0,
    )


def synthetic_image(width: int, height: int, seed: int = 0) -> LoadedImage:
    """A deterministic test image: red/green gradients with seeded noise in blue.

    The same ``(width, height, seed)`` always gives the same bytes, so tests,
    ``vlmduo doctor`` and benchmarks need no file on disk.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"synthetic image size must be positive, got {width}x{height}")
    import numpy as np

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)[None, :]
    pixels[..., 1] = np.linspace(0, 255, height, dtype=np.float32).astype(np.uint8)[:, None]
    pixels[..., 2] = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    return LoadedImage(
        rgb=pixels.tobytes(),
        width=width,
        height=height,
        source=f"synthetic:{width}x{height}:seed={seed}",
        decode_ms=(time.perf_counter() - start) * 1000.0,
    )


def _display_name(source: str) -> str:
    """How a source appears in messages: stdin by name, long strings shortened."""
    if source == STDIN:
        return "stdin"
    return source if len(source) <= 200 else source[:197] + "..."


def _megapixels(n: float) -> str:
    return f"{n / 1e6:.3g} MP"


def _file_error(exc: OSError, name: str) -> ImageError:
    """The one line for an image file that could not be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"image not found: {name}")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"is a directory, not an image: {name}")
    if isinstance(exc, PermissionError):
        return ImageError(f"permission denied reading image: {name}")
    return ImageError(f"cannot read image {name}: {one_line(exc.strerror or exc)}")


def _check_path(source: str, name: str) -> Path:
    """Stat the path first so the common mistakes get a specific message."""
    path = Path(source).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise _file_error(exc, name) from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"is a directory, not an image: {name}")
    # Only regular files: a FIFO such as <(curl ...) reports size 0 but has data.
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise ImageError(f"image file is empty: {name}")
    return path


def _read_stdin(stdin: BinaryIO | None, max_bytes: int) -> bytes:
    """Read all of stdin, refusing a terminal (it would wait forever) and oversize input."""
    stream = stdin if stdin is not None else sys.stdin.buffer
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        raise ImageError("stdin is a terminal: pipe an image into 'vlmduo ask - ...'")
    try:
        data = stream.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read image from stdin: {one_line(exc)}") from exc
    if not data:
        raise ImageError("empty stdin: pipe an image into 'vlmduo ask - ...'")
    if len(data) > max_bytes:
        raise ImageError(f"image on stdin exceeds {human_size(max_bytes)}")
    return data


def _decode(fp: Path | BinaryIO, name: str, max_pixels: int) -> tuple[int, int, bytes]:
    """Open, bound, decode, orient and convert; map every Pillow failure to one line."""
    from PIL import Image, UnidentifiedImageError

    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it an error here.
    # catch_warnings restores the filters on exit, so other code is unaffected.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as img:
                _check_size(img.size, name, max_pixels)
                img.load()  # first frame only for animated images: Image.open sits on it
                rgb = _to_rgb(_oriented(img), name)
                return rgb.width, rgb.height, rgb.tobytes()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(_bomb_message(str(exc), name, max_pixels)) from exc
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise _file_error(exc, name) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"not an image (or a format Pillow cannot read): {name}") from exc
        except MemoryError as exc:
            raise ImageError(f"not enough memory to decode image: {name}") from exc
        except _DECODE_ERRORS as exc:
            detail = one_line(exc)
            suffix = f" ({detail})" if detail else ""
            raise ImageError(f"image is truncated or corrupt: {name}{suffix}") from exc


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """Refuse absurd sizes from the header alone, before any pixel is decoded."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height}): {name}")
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} pixels (limit {_megapixels(max_pixels)}): {name}"
        )


def _bomb_message(pillow_message: str, name: str, max_pixels: int) -> str:
    """Pillow tripped first, so only its pixel count is known, not width and height."""
    from PIL import Image

    pillow_limit = Image.MAX_IMAGE_PIXELS or max_pixels
    limit = _megapixels(min(max_pixels, pillow_limit))
    match = re.search(r"\((\d+) pixels\)", pillow_message)
    size = f"{_megapixels(int(match.group(1)))}" if match else "above the decompression-bomb limit"
    return f"image too large: {size} (limit {limit}): {name}"


def _oriented(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation so the model sees the photo the way people do."""
    from PIL import ImageOps

    try:
        # In place: the default returns a full copy even when there is nothing to do.
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        # A malformed EXIF block must not cost the user the image: keep it unrotated.
        pass
    return img


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    from PIL import Image

    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        img = _to_8bit_grey(img)
    # Palette and colour-keyed (tRNS) images carry transparency in img.info.
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        if img.mode in _ALPHA_MODES:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported colour mode {img.mode}: {name}") from exc


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float greyscale to 8 bits.

    ``convert("L")`` would clip 16-bit values at 255 and turn most of the image white.
    """
    import numpy as np
    from PIL import Image

    arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = arr / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
