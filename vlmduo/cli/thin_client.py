"""``vlmduo ask`` as a thin client of a running ``vlmduo serve`` (standard library only).

Asking a warm server should cost a little more than the answer. A whole
``vlmduo ask`` process imports typer, rich, httpx and vlmduo's own CLI (about
0.4 s on a 2-core machine) before it can ask anything; this module imports none
of them. It finds a ready server in the run directory, sends it the command line,
the image's bytes and what the terminal looks like, and prints what comes back:
the server parses, checks, answers and renders with the same code as
in-process (:mod:`vlmduo.cli.served`), so the output is the same.

Whenever this module is not sure, it declines (returns None) and ``vlmduo ask``
runs as usual, which may still use the server through its own client: no server,
``--help``, ``--no-server``, ``--each``/``--batch``, ``--debug``, a URL image, an
image it cannot read, a relative model path (the server's working directory is
not ours), an option it does not know, an interrupted or failed connection
before the answer. The server declines, too, what it cannot answer exactly.

HTTP/1.1 is written on a socket here, not with ``http.client``: importing that
(with ``ssl`` and ``email``) costs about 22 ms, more than the rest of this path.
One request, ``Connection: close``, a JSON body each way.
"""

from __future__ import annotations

import binascii
import json
import os
import socket
import sys
import time
from collections.abc import Mapping

from vlmduo import __version__, paths
from vlmduo.cli.process import TERMINAL_ENV
from vlmduo.serve import address

# Every option of ``vlmduo ask`` by whether it takes a value; a test holds these to
# the typer command, so an option added there and not here fails the tests.
VALUE_OPTIONS = frozenset(
    {
        "--small", "--large", "--small-mmproj", "--large-mmproj", "--pair", "--mode", "--policy",
        "--format", "--max-answer-tokens", "--think-budget", "--transfer-budget", "--selector",
        "--confidence-threshold", "--seed", "--temperature", "--threads", "--n-gpu-layers", "--ctx",
        "--image-max-tokens", "--image-min-tokens", "--each", "--batch",
    }
)  # fmt: skip
FLAG_OPTIONS = frozenset(
    {
        "--json", "--quiet", "-q", "--show-reasoning", "--sequential", "--offline", "--verbose",
        "--debug", "--no-server", "--no-image-cache", "--help",
    }
)  # fmt: skip
# Options whose presence sends the ask down the usual path.
LOCAL_OPTIONS = frozenset({"--each", "--batch", "--no-server", "--debug", "--help"})
# Options after which nothing but the answer (or the JSON object) is printed.
QUIET_OPTIONS = frozenset({"-q", "--quiet", "--json"})
MODEL_OPTIONS = frozenset({"--small", "--large", "--small-mmproj", "--large-mmproj"})
# The environment variables that change what ``vlmduo ask`` means (models, registry,
# caches, offline): the server answers only a client whose values equal its own.
# Credentials are left out: they change no answer from models already loaded.
_ENV_PREFIXES = ("VLMDUO_", "HF_", "XDG_")
_ENV_NAMES = ("HOME", "TRANSFORMERS_OFFLINE")
_ENV_IGNORED = ("VLMDUO_SERVER_WAIT", "VLMDUO_DEBUG")
_CREDENTIAL_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
_MAX_IMAGE_BYTES = 50 * 2**20  # read_image_bytes's own cap; beyond it the usual path says why
_FALSE = ("", "0", "false", "no", "off", "f", "n")


def positionals(argv: list[str]) -> list[str] | None:
    """The positional arguments of ``vlmduo ask ARGV``, or None to decline.

    Parsed as click parses: ``--opt value``, ``--opt=value``, flags; anything else
    that starts with ``-`` (but ``-`` itself, stdin) is not ours to judge.
    """
    found: list[str] = []
    args = iter(argv)
    for arg in args:
        name, has_value, value = arg.partition("=")
        if arg == "-" or not arg.startswith("-"):
            found.append(arg)
        elif name in LOCAL_OPTIONS:
            return None
        elif name in VALUE_OPTIONS:
            if not has_value:
                value = next(args, None)
                if value is None:
                    return None
            if name in MODEL_OPTIONS and not os.path.isabs(value):
                return None
        elif arg not in FLAG_OPTIONS:
            return None  # --, a short-option cluster, an unknown or misspelled option
    return found


def meaning_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that change what an ask means (see _ENV_PREFIXES)."""
    return {
        name: value
        for name, value in environ.items()
        if (name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES)
        and name not in _ENV_IGNORED
        and not any(word in name for word in _CREDENTIAL_WORDS)
    }


def _ready_servers() -> list[dict]:
    """Records of ready servers that take thin clients, oldest first."""
    folder = paths.run_dir()
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
    except OSError:
        return []
    found = []
    for name in sorted(names):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                record = json.load(handle)
            os.kill(int(record["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone, being replaced, or not ours to signal
        if record.get("state") == "ready" and record.get("cli_token"):
            found.append(record)
    return sorted(found, key=lambda r: r.get("started", 0))


def _read_image(image: str) -> tuple[bytes, float] | None:
    """The bytes of IMAGE and the ms to read them; None when the usual path should say why not."""
    start = time.perf_counter()
    try:
        if image == "-":
            if sys.stdin is None or sys.stdin.isatty():
                return None
            data = sys.stdin.buffer.read(_MAX_IMAGE_BYTES + 1)
        elif image.startswith("~") or "://" in image:
            return None
        else:
            with open(image, "rb") as handle:
                data = handle.read(_MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError):
        return None
    if not data or len(data) > _MAX_IMAGE_BYTES:
        return None
    return data, (time.perf_counter() - start) * 1000.0


def _terminal() -> dict:
    size = None
    for fd in (0, 1, 2):  # as rich looks for the terminal's size
        try:
            size = list(os.get_terminal_size(fd))
        except (OSError, ValueError, AttributeError):
            continue
        break
    return {
        "stdout_tty": _isatty(sys.stdout),
        "stderr_tty": _isatty(sys.stderr),
        "size": size,
        "env": {name: os.environ[name] for name in TERMINAL_ENV if name in os.environ},
    }


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def _url(record: dict) -> str:
    return address.url(record["host"], record["port"])


def _post(record: dict, body: bytes) -> dict | None:
    """``POST /api/cli/ask`` to the server of ``record``; its JSON reply, or None when the
    server cannot be reached or does not answer 200 (the usual path then runs)."""
    where = address.connect_to(record["host"], record["port"])
    headers = [
        "POST /api/cli/ask HTTP/1.1",
        f"Host: {_url(record).removeprefix('http://')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Vlmduo-Cli-Token: {record['cli_token']}",
        "Connection: close",
    ]
    key = os.environ.get("VLMDUO_API_KEY")
    if key:
        headers.append(f"Authorization: Bearer {key}")
    try:
        with socket.create_connection(where, timeout=5.0) as sock:
            sock.settimeout(None)  # a long reasoning is legitimate; Ctrl-C ends it
            sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body)
            reply = _read_all(sock)
    except OSError:
        return None
    head, _, payload = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200" or b"transfer-encoding: chunked" in head.lower():
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def ask(argv: list[str]) -> int | None:
    """Answer ``vlmduo ask ARGV`` through a ready server: the exit code, having printed what
    ``vlmduo ask`` prints; None when the usual path must run (nothing printed, nothing lost:
    an image read from stdin is put back)."""
    if os.environ.get("VLMDUO_NO_SERVER", "").strip().lower() not in _FALSE:
        return None
    if os.environ.get("VLMDUO_DEBUG", "") not in ("", "0", "false"):
        return None
    args = positionals(argv)
    if args is None or len(args) != 2:
        return None
    servers = _ready_servers()
    if not servers:
        return None
    image = None
    if args[0] != "example":
        image = _read_image(args[0])
        if image is None:
            return None
    try:
        return _ask_servers(servers, argv, image)
    finally:
        if args[0] == "-" and image is not None:
            _put_back_stdin(image[0])


def _ask_servers(servers: list[dict], argv: list[str], image: tuple[bytes, float] | None) -> int | None:
    from vlmduo.cli.clock import process_ms

    body = {
        "argv": argv,
        "image": binascii.b2a_base64(image[0], newline=False).decode("ascii") if image else None,
        "read_ms": image[1] if image else 0.0,
        "env": meaning_env(os.environ),
        "version": __version__,
        "terminal": _terminal(),
    }
    status = _isatty(sys.stderr) and not QUIET_OPTIONS.intersection(argv)
    for record in servers:
        body["elapsed_ms"] = process_ms()[0]
        if status:  # as the usual path's spinner says it, without rich: one line, erased
            sys.stderr.write(f"Asking the server at {_url(record)}…")
            sys.stderr.flush()
        try:
            reply = _post(record, json.dumps(body).encode())
        except KeyboardInterrupt:
            return _interrupted()
        finally:
            if status:
                sys.stderr.write("\r\x1b[2K")
        if reply is None or "declined" in reply:
            continue
        sys.stdout.write(reply.get("stdout", ""))
        sys.stdout.flush()
        sys.stderr.write(reply.get("stderr", ""))
        sys.stderr.flush()
        return int(reply.get("exit_code", 1))
    return None


def _put_back_stdin(data: bytes) -> None:
    """The usual path reads the image from stdin again: give it the bytes read here."""
    import io

    sys.stdin = io.TextIOWrapper(io.BytesIO(data))


def _interrupted() -> int:
    """Ctrl-C while the server answered: closing the connection cancelled its work."""
    from vlmduo.cli.errors import report

    return report(KeyboardInterrupt())
