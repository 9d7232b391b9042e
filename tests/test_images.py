"""Image input: every format and mode to RGB888, and one clear line for every failure."""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmduo.errors import ImageError
from vlmduo.media.images import LoadedImage, load_image, synthetic_image
from vlmduo.media.url import USER_AGENT

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pixel(img: LoadedImage, x: int, y: int) -> tuple[int, ...]:
    """The RGB triple at (x, y) of a loaded image."""
    offset = (y * img.width + x) * 3
    return tuple(img.rgb[offset : offset + 3])


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    """Lossy codecs (JPEG, WebP) move colours a little."""
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def image_error(source: str, **kwargs: object) -> str:
    """Load ``source`` expecting failure; return the message after checking it is one line."""
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message == info.value.message
    assert "\n" not in message and message.strip() == message
    return message


def solid(mode: str, size: tuple[int, int], colour: object) -> Image.Image:
    return Image.new(mode, size, colour)  # type: ignore[arg-type]


def noise_png(path: Path, size: int = 64) -> bytes:
    """An incompressible PNG, so cutting it in half really truncates pixel data."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims ``width``x``height`` but holds almost no data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


# --- formats and modes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "suffix", "tol"),
    [("PNG", "png", 0), ("JPEG", "jpg", 12), ("WEBP", "webp", 12), ("BMP", "bmp", 0)],
)
def test_formats_decode_to_packed_rgb(tmp_path: Path, fmt: str, suffix: str, tol: int) -> None:
    path = tmp_path / f"img.{suffix}"
    img = solid("RGB", (40, 30), (0, 0, 0))
    img.paste(RED, (0, 0, 20, 30))
    img.paste(BLUE, (20, 0, 40, 30))
    img.save(path, fmt)
    loaded = load_image(str(path))
    assert (loaded.width, loaded.height) == (40, 30)
    assert len(loaded.rgb) == 40 * 30 * 3
    assert loaded.source == str(path)
    assert loaded.decode_ms > 0
    assert close_to(pixel(loaded, 5, 15), RED, tol)
    assert close_to(pixel(loaded, 35, 15), BLUE, tol)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [solid("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    loaded = load_image(str(path))
    assert (loaded.width, loaded.height) == (16, 16)
    assert pixel(loaded, 8, 8) == RED


def test_greyscale(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    solid("L", (8, 4), 100).save(path)
    loaded = load_image(str(path))
    assert pixel(loaded, 3, 2) == (100, 100, 100)
    assert len(loaded.rgb) == 8 * 4 * 3


def test_one_bit_bmp(tmp_path: Path) -> None:
    path = tmp_path / "bw.bmp"
    img = solid("1", (8, 8), 0)
    img.paste(1, (4, 0, 8, 8))
    img.save(path)
    loaded = load_image(str(path))
    assert pixel(loaded, 0, 0) == (0, 0, 0)
    assert pixel(loaded, 7, 0) == WHITE


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    img = solid("RGBA", (3, 1), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: white
    img.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    img.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black: mid grey
    img.save(path)
    loaded = load_image(str(path))
    assert pixel(loaded, 0, 0) == WHITE
    assert pixel(loaded, 1, 0) == BLUE
    assert close_to(pixel(loaded, 2, 0), (127, 127, 127), 2)


def test_greyscale_with_alpha(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    solid("LA", (2, 2), (0, 0)).save(path)
    assert pixel(load_image(str(path)), 0, 0) == WHITE


def test_palette_and_palette_transparency(tmp_path: Path) -> None:
    plain = tmp_path / "palette.png"
    solid("RGB", (4, 4), GREEN).convert("P", palette=Image.Palette.ADAPTIVE).save(plain)
    with Image.open(plain) as check:
        assert check.mode == "P"
    assert pixel(load_image(str(plain)), 1, 1) == GREEN

    keyed = tmp_path / "keyed.gif"
    img = Image.new("P", (4, 4), 1)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.save(keyed, transparency=0)
    loaded = load_image(str(keyed))
    assert pixel(loaded, 0, 0) == WHITE  # the transparent index
    assert pixel(loaded, 3, 3) == BLUE


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    loaded = load_image(str(path))
    assert [pixel(loaded, x, 0)[0] for x in range(4)] == [0, 64, 128, 255]
    assert pixel(loaded, 2, 0) == (128, 128, 128)


def test_float_greyscale_tiff(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    loaded = load_image(str(path))
    assert [pixel(loaded, x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    img = solid("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: white
    img.paste((0, 0, 0, 255), (8, 0, 16, 8))  # full black ink
    img.save(path, "JPEG", quality=95)
    loaded = load_image(str(path))
    assert close_to(pixel(loaded, 2, 4), WHITE)
    assert close_to(pixel(loaded, 13, 4), (0, 0, 0))


def test_exif_orientation_6_rotates_clockwise(tmp_path: Path) -> None:
    # Stored 64x32 with four coloured quadrants; orientation 6 means "rotate 90 degrees
    # clockwise to display", so the stored top-left quadrant ends up top-right.
    path = tmp_path / "rotated.jpg"
    img = solid("RGB", (64, 32), WHITE)
    img.paste(RED, (0, 0, 32, 16))
    img.paste(GREEN, (32, 0, 64, 16))
    img.paste(BLUE, (0, 16, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    loaded = load_image(str(path))
    assert (loaded.width, loaded.height) == (32, 64)
    assert len(loaded.rgb) == 32 * 64 * 3
    assert close_to(pixel(loaded, 24, 16), RED)  # top-right
    assert close_to(pixel(loaded, 24, 48), GREEN)  # bottom-right
    assert close_to(pixel(loaded, 8, 16), BLUE)  # top-left
    assert close_to(pixel(loaded, 8, 48), WHITE)  # bottom-left


def test_loaded_image_repr_hides_pixels() -> None:
    assert "rgb" not in repr(synthetic_image(4, 4))


# --- synthetic -----------------------------------------------------------------------


def test_synthetic_image_is_deterministic() -> None:
    a, b, c = synthetic_image(33, 17), synthetic_image(33, 17), synthetic_image(33, 17, seed=1)
    assert (a.width, a.height, len(a.rgb)) == (33, 17, 33 * 17 * 3)
    assert a.rgb == b.rgb
    assert a.rgb != c.rgb
    assert pixel(a, 0, 0)[:2] == (0, 0) and pixel(a, 32, 16)[:2] == (255, 255)
    assert a.source.startswith("synthetic:")


def test_synthetic_image_rejects_empty_size() -> None:
    with pytest.raises(ImageError, match="positive"):
        synthetic_image(0, 10)


# --- file failures -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "cat.jpg"
    assert image_error(str(missing)) == f"image not found: {missing}"


def test_directory(tmp_path: Path) -> None:
    assert image_error(str(tmp_path)) == f"is a directory, not an image: {tmp_path}"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert image_error(str(path)) == f"image file is empty: {path}"


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\nsecond line\n")
    message = image_error(str(path))
    assert message == f"not an image (or a format Pillow cannot read): {path}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = image_error(str(path))
    assert message.startswith(f"image is truncated or corrupt: {path}")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    solid("RGB", (2, 2), RED).save(path)
    path.chmod(0)
    try:
        assert image_error(str(path)) == f"permission denied reading image: {path}"
    finally:
        path.chmod(0o600)


def test_permission_denied_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The chmod test above cannot run as root; fake the failure where Pillow opens the file.
    path = tmp_path / "secret.png"
    solid("RGB", (2, 2), RED).save(path)

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    assert image_error(str(path)) == f"permission denied reading image: {path}"


# --- decompression bombs -------------------------------------------------------------


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    solid("RGB", (100, 100), RED).save(path)
    message = image_error(str(path), max_pixels=5000)
    assert message == f"image too large: 100x100 pixels (limit 0.005 MP): {path}"
    assert load_image(str(path), max_pixels=10_000).width == 100


def test_bomb_shaped_png_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    message = image_error(str(path))
    assert message.startswith("image too large: ")
    assert message.endswith(f": {path}")


def test_pillow_bomb_warning_becomes_error_without_leaking_state(tmp_path: Path) -> None:
    # 10000x10000 lies between Pillow's warning and error thresholds; with our own limit
    # raised above it, Pillow's warning is what trips, and it must be an error.
    path = tmp_path / "warn.png"
    path.write_bytes(png_header_only(10000, 10000))
    before_filters, before_limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping load_image fails the test
        message = image_error(str(path), max_pixels=10**9)
    assert message.startswith("image too large: 100 MP")
    assert warnings.filters == before_filters
    assert Image.MAX_IMAGE_PIXELS == before_limit


# --- stdin ---------------------------------------------------------------------------


def png_bytes(colour: tuple[int, int, int] = RED, size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    solid("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_stdin() -> None:
    loaded = load_image("-", stdin=io.BytesIO(png_bytes()))
    assert (loaded.width, loaded.height, loaded.source) == (6, 5, "-")
    assert pixel(loaded, 5, 4) == RED


def test_empty_stdin() -> None:
    message = image_error("-", stdin=io.BytesIO(b""))
    assert message == "empty stdin: pipe an image into 'vlmduo ask - ...'"


def test_stdin_not_an_image() -> None:
    message = image_error("-", stdin=io.BytesIO(b"hello"))
    assert message == "not an image (or a format Pillow cannot read): stdin"


def test_stdin_too_large() -> None:
    message = image_error("-", stdin=io.BytesIO(png_bytes()), max_bytes=10)
    assert message == "image on stdin exceeds 10 bytes"


def test_stdin_terminal_is_refused() -> None:
    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    assert image_error("-", stdin=Terminal()).startswith("stdin is a terminal")


# --- URLs ----------------------------------------------------------------------------

CAP = 4096


class Handler(BaseHTTPRequestHandler):
    """Routes for every download outcome; state lives on the server object."""

    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.user_agents.append(self.headers.get("User-Agent", ""))
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (size cap, timeout)

    def route(self) -> None:
        if self.path == "/cat.png":
            self.send_body(png_bytes(BLUE, (7, 3)), "image/png")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        elif self.path == "/redirect-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/cat.png")
            self.end_headers()
        elif self.path == "/text":
            self.send_body(b"<html>hello</html>", "text/html")
        elif self.path == "/empty":
            self.send_body(b"", "image/png")
        elif self.path == "/big-declared":
            self.send_body(b"x" * (CAP + 1), "image/png")
        elif self.path == "/big-undeclared":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the real byte count must be capped
            self.wfile.write(b"x" * (CAP * 4))
            self.close_connection = True
        elif self.path == "/slow":
            self.server.release.wait(5)  # beyond any test's timeout
            self.send_body(png_bytes(), "image/png")
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):  # each byte is within the socket timeout, the sum is not
                if self.server.release.wait(0.05):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()
        else:
            self.send_error(404, "Not Found")

    def send_body(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output clean


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.user_agents: list[str] = []
        self.release = threading.Event()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ImageServer]:
    """An HTTP server on 127.0.0.1 with an OS-chosen port, for this test only."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = ImageServer()
    # A short poll interval keeps shutdown (and so each test) fast.
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def url(srv: ImageServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_url_image(server: ImageServer) -> None:
    loaded = load_image(url(server, "/cat.png"))
    assert (loaded.width, loaded.height) == (7, 3)
    assert pixel(loaded, 6, 2) == BLUE
    assert loaded.source == url(server, "/cat.png")
    assert server.user_agents == [USER_AGENT]
    assert USER_AGENT.startswith("vlmduo/")


def test_url_redirect(server: ImageServer) -> None:
    assert load_image(url(server, "/redirect")).width == 7


def test_url_redirect_to_other_scheme_is_refused(server: ImageServer) -> None:
    message = image_error(url(server, "/redirect-ftp"))
    assert message.startswith(f"could not fetch {url(server, '/redirect-ftp')}: HTTP 302")


def test_url_404(server: ImageServer) -> None:
    target = url(server, "/missing.png")
    assert image_error(target) == f"could not fetch {target}: HTTP 404 Not Found"


def test_url_not_an_image(server: ImageServer) -> None:
    target = url(server, "/text")
    assert image_error(target) == f"not an image (or a format Pillow cannot read): {target}"


def test_url_empty_body(server: ImageServer) -> None:
    target = url(server, "/empty")
    assert image_error(target) == f"could not fetch {target}: the server sent an empty body"


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_url_size_cap(server: ImageServer, path: str) -> None:
    target = url(server, path)
    message = image_error(target, max_bytes=CAP)
    assert message == f"image download exceeds 4 KiB: {target}"


def test_url_slow_server_times_out(server: ImageServer) -> None:
    target = url(server, "/slow")
    assert image_error(target, timeout=0.3) == f"could not fetch {target}: timed out after 0.3 s"


def test_url_dripping_server_hits_total_deadline(server: ImageServer) -> None:
    target = url(server, "/drip")
    assert image_error(target, timeout=0.4) == f"could not fetch {target}: timed out after 0.4 s"


def test_url_connection_refused() -> None:
    # Bind then close to get a port nobody listens on.
    probe = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = probe.server_address[1]
    probe.server_close()
    target = f"http://127.0.0.1:{port}/cat.png"
    assert image_error(target, timeout=2).startswith(f"could not fetch {target}: ")


@pytest.mark.parametrize("source", ["ftp://127.0.0.1/cat.png", "file:///etc/passwd"])
def test_url_scheme_must_be_http(source: str) -> None:
    scheme = source.split(":")[0]
    message = image_error(source)
    assert message == f"unsupported URL scheme '{scheme}' (only http and https): {source}"
