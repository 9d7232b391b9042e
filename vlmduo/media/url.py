"""Downloading an image given as an http(s) URL, with a size cap and a total deadline.

Its own module so that ``vlmduo ask photo.jpg`` does not import urllib and
http.client (about 15 ms of every process).
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from typing import BinaryIO
from urllib.parse import urlsplit

from vlmduo import __version__
from vlmduo.errors import ImageError, human_size, one_line

USER_AGENT = f"vlmduo/{__version__} (python-urllib)"
_CHUNK = 64 * 1024


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s); urllib alone would also follow ftp://."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: BinaryIO,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, *, timeout: float, max_bytes: int) -> bytes:
    """Download ``url`` into memory, enforcing the size cap and a total deadline."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"unsupported URL scheme '{scheme}' (only http and https): {url}")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*, */*;q=0.5"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        with opener.open(request, timeout=timeout) as response:
            return _read_body(response, url, timeout=timeout, max_bytes=max_bytes)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {one_line(exc.reason)}".rstrip()
        raise ImageError(f"could not fetch {url}: {reason}") from exc
    except urllib.error.URLError as exc:
        raise ImageError(f"could not fetch {url}: {_fetch_reason(exc.reason, timeout)}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ImageError(f"could not fetch {url}: {_fetch_reason(exc, timeout)}") from exc


def _read_body(response: http.client.HTTPResponse, url: str, *, timeout: float, max_bytes: int) -> bytes:
    """Stream the body, checking Content-Length up front and the real byte count as it comes."""
    too_large = f"image download exceeds {human_size(max_bytes)}: {url}"
    length = response.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > max_bytes:
        raise ImageError(too_large)
    # The socket timeout is per read; a server dripping bytes would never trip it.
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    total = 0
    while True:
        # read1 returns after one recv, so the deadline is checked between drips.
        chunk = response.read1(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise ImageError(too_large)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise ImageError(f"could not fetch {url}: timed out after {timeout:g} s")
    if total == 0:
        raise ImageError(f"could not fetch {url}: the server sent an empty body")
    return b"".join(chunks)


def _fetch_reason(reason: object, timeout: float) -> str:
    """A short reason for a failed download; timeouts say how long we waited."""
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return one_line(reason.strerror)
    text = one_line(reason)
    return text or type(reason).__name__
