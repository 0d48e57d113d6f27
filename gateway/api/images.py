"""Image input, read the same way for every API family, with the operator's limits.

Each family finds its images in its own shape (Responses ``input_image``, Chat ``image_url``
parts, Messages ``image`` blocks) and turns each into an ``ImagePart`` here: the image's bytes and
media type, checked against the limits (``gateway --max-image-mb``, ``--max-image-pixels``,
``--max-images``), each failure a 400 naming the field. Images travel to the worker as bytes inside
the message's content parts (``request.template_message``); a text-only worker refuses them.

- ``data:`` URLs and base64 sources are read here; ``http(s)://`` URLs are refused unless the
  operator passes ``gateway --allow-image-urls`` (a server that fetches any URL it is given can be
  turned against the network it sits in). When allowed, a family's converter runs in a worker
  thread (``convert``: at most ``FETCH_THREADS`` requests' at once; the event loop keeps serving),
  the request's images are counted before any is fetched, and all its fetches together have one
  deadline (``--image-url-timeout``) and one byte budget (``FETCHED_BYTES_FACTOR`` images' worth),
  each image still stopped at the per-image limit: allow it on a gateway whose clients you trust.
- Pixels: width × height read from the image's header (PNG, JPEG, GIF, WebP; nothing is decoded
  here; a GIF's frames too, as the decoder grows the image to a frame larger than its screen), so
  an image that would decode to gigabytes is refused before any work.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.api.errors import APIError

T = TypeVar("T")

DEFAULT_MAX_IMAGE_BYTES = 20 << 20
DEFAULT_MAX_IMAGE_PIXELS = 7680 * 4320  # 8K UHD
DEFAULT_MAX_IMAGES = 50
DEFAULT_URL_TIMEOUT = 10.0
MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
FETCH_THREADS = 4  # requests whose image URLs are fetched at once (others wait for a thread)
FETCHED_BYTES_FACTOR = 4  # a request's fetched images together: at most this many images' limit


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES  # per request (the whole conversation it sends)
    allow_urls: bool = False
    url_timeout: float = DEFAULT_URL_TIMEOUT


_limits = ImageLimits()


def configure(limits: ImageLimits) -> None:
    """The operator's limits (``gateway/cli.py``)."""
    global _limits
    _limits = limits


def limits() -> ImageLimits:
    return _limits


@dataclass
class _Budget:
    """One request's image fetching: its deadline and the bytes fetched so far."""

    deadline: float
    fetched: int = 0


_budget: ContextVar[_Budget | None] = ContextVar("image_fetch_budget", default=None)
_limiter: Any = None


@contextmanager
def one_request() -> Iterator[None]:
    """The fetches made inside share one deadline and one byte budget (a request's converter)."""
    token = _budget.set(_Budget(time.monotonic() + _limits.url_timeout))
    try:
        yield
    finally:
        _budget.reset(token)


async def convert(converter: Callable[..., T], *args: Any) -> T:
    """``converter(*args)`` (a family's request converter, which reads the request's images) as one
    request's fetching; in a worker thread when image URLs may be fetched, so that a slow image
    server holds that thread (one of ``FETCH_THREADS``) and not the event loop."""
    def run() -> T:
        with one_request():
            return converter(*args)

    if not _limits.allow_urls:
        return run()  # nothing is fetched: no thread hop
    import anyio

    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(FETCH_THREADS)
    return await anyio.to_thread.run_sync(run, limiter=_limiter)


def check_parts(count: int, param: str) -> None:
    """A request's image parts, counted before any is read or fetched (``gateway --max-images``)."""
    check_count(count, param)


@dataclass
class ImagePart:
    """One image of a message: its bytes and media type (sniffed from the bytes)."""

    data: bytes
    media_type: str
    width: int = 0
    height: int = 0


_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[^;,]*)*)(;base64)?,", re.IGNORECASE)


def from_url(url: object, param: str) -> ImagePart:
    """An image given by URL (OpenAI's ``image_url``): a ``data:`` URL, or http(s) if allowed."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image needs a URL: a data: URL with the image in base64", param=param)
    if url[:5].lower() == "data:":
        match = _DATA_URL.match(url)
        if match is None or not match.group(3):
            raise APIError(400, "an image data: URL must be base64 (data:image/png;base64,...)", param=param)
        return from_base64(url[match.end():], match.group(1), param)
    if url[:7].lower() == "http://" or url[:8].lower() == "https://":
        return fetch(url, param)
    raise APIError(400, f"unsupported image URL scheme in {url[:32]!r}: send a data: URL with the image in base64",
                   param=param)


def from_base64(data: object, media_type: object, param: str) -> ImagePart:
    """An image given as base64 text (Anthropic's ``source.data``, a data URL's payload)."""
    if not isinstance(data, str) or not data:
        raise APIError(400, "an image needs its data in base64", param=param)
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image's base64 data does not decode", param=param) from None
    return checked(raw, media_type if isinstance(media_type, str) else None, param)


def fetch(url: str, param: str) -> ImagePart:
    if not _limits.allow_urls:
        raise APIError(400, "image URLs are not fetched by this server (its operator can allow it with gateway "
                       "--allow-image-urls): send the image as a data: URL with base64 data", param=param,
                       code="image_url_not_allowed")
    import asyncio

    import httpx

    budget = _budget.get() or _Budget(time.monotonic() + _limits.url_timeout)
    try:
        # Bounded by the request's deadline (asyncio.wait_for), in a loop of this worker thread's own:
        # httpx's timeouts are per operation, so a server dripping bytes would outlast them.
        data = asyncio.run(_download(url, budget, param))
    except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException):
        raise APIError(400, f"fetching the request's images took longer than {_limits.url_timeout:g}s "
                       "(gateway --image-url-timeout)", param=param, code="image_url_timeout") from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError) as exc:
        # ValueError: UnicodeError and idna's errors too (a label too long, "xn--" with nothing after)
        raise APIError(400, f"fetching the image failed: {type(exc).__name__}: the URL cannot be fetched",
                       param=param) from None
    return checked(data, None, param)


async def _download(url: str, budget: _Budget, param: str) -> bytes:
    import asyncio

    remaining = budget.deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return await asyncio.wait_for(_read(url, budget, param, remaining), remaining)


async def _read(url: str, budget: _Budget, param: str, remaining: float) -> bytes:
    import httpx

    limit = _limits.max_bytes
    total_limit = FETCHED_BYTES_FACTOR * limit
    async with httpx.AsyncClient(timeout=remaining, follow_redirects=True, max_redirects=3) as client, \
            client.stream("GET", url) as response:
        if response.status_code != 200:
            raise APIError(400, f"fetching the image failed: HTTP {response.status_code}", param=param)
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            budget.fetched += len(chunk)
            if size > limit:
                raise APIError(400, f"the image is larger than this server's limit of {_size(limit)} "
                               "(gateway --max-image-mb)", param=param, code="image_too_large")
            if budget.fetched > total_limit:
                raise APIError(400, f"the request's fetched images are more than {_size(total_limit)} together "
                               f"({FETCHED_BYTES_FACTOR} times gateway --max-image-mb)", param=param,
                               code="image_too_large")
            chunks.append(chunk)
    return b"".join(chunks)


def checked(raw: bytes, media_type: str | None, param: str) -> ImagePart:
    """The image, if it is within the limits and of a type the worker reads."""
    limit = _limits.max_bytes
    if len(raw) > limit:
        raise APIError(400, f"the image is {_size(len(raw))}, more than this server's limit of {_size(limit)} "
                       "(gateway --max-image-mb)", param=param, code="image_too_large")
    sniffed = image_size(raw)
    if sniffed is None:
        shown = f" ({media_type})" if media_type else ""
        raise APIError(400, f"the image{shown} is not a PNG, JPEG, GIF or WebP image this server can read",
                       param=param, code="invalid_image")
    kind, width, height = sniffed
    if width <= 0 or height <= 0:
        raise APIError(400, "the image has no pixels", param=param, code="invalid_image")
    if width * height > _limits.max_pixels:
        raise APIError(400, f"the image is {width}x{height} pixels, more than this server's limit of "
                       f"{_limits.max_pixels:,} pixels (gateway --max-image-pixels)", param=param,
                       code="image_too_large")
    return ImagePart(raw, kind, width, height)


def check_count(count: int, param: str) -> None:
    if count > _limits.max_images:
        raise APIError(400, f"the request has {count} images, more than this server's limit of "
                       f"{_limits.max_images} (gateway --max-images)", param=param, code="too_many_images")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n:,} bytes"


# --- image headers ------------------------------------------------------------------


def image_size(raw: bytes) -> tuple[str, int, int] | None:
    """(media type, width, height) from the header of a PNG, JPEG, GIF or WebP image; None for
    anything else (or a header too short to tell)."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24 and raw[12:16] == b"IHDR":
        width, height = struct.unpack(">II", raw[16:24])
        return "image/png", width, height
    if raw[:6] in (b"GIF87a", b"GIF89a") and len(raw) >= 10:
        width, height = struct.unpack("<HH", raw[6:10])
        frame_width, frame_height = _gif_frames_extent(raw)
        return "image/gif", max(width, frame_width), max(height, frame_height)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" and len(raw) >= 30:
        return _webp_size(raw)
    if raw[:2] == b"\xff\xd8":
        return _jpeg_size(raw)
    return None


def _webp_size(raw: bytes) -> tuple[str, int, int] | None:
    chunk = raw[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(raw[24:27], "little")
        height = 1 + int.from_bytes(raw[27:30], "little")
        return "image/webp", width, height
    if chunk == b"VP8L" and raw[20] == 0x2F:
        bits = int.from_bytes(raw[21:25], "little")
        return "image/webp", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and raw[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", raw[26:30])
        return "image/webp", width & 0x3FFF, height & 0x3FFF
    return None


MAX_HEADER_STEPS = 100_000  # blocks (GIF) or markers (JPEG) a header scan reads before it gives up


def _gif_frames_extent(raw: bytes) -> tuple[int, int]:
    """The right and bottom edges of a GIF's frames: Pillow grows the image to a frame that reaches
    past the logical screen, so the screen's size alone is no bound. A scan stopped early (past
    ``MAX_HEADER_STEPS`` blocks, or at a truncated block) gives the frames seen so far; the worker
    checks the decoded size again."""
    right = bottom = 0
    at = 13
    if len(raw) > 10 and raw[10] & 0x80:  # global colour table
        at += 3 << ((raw[10] & 7) + 1)
    steps = 0
    while at < len(raw) and steps < MAX_HEADER_STEPS:
        steps += 1
        block = raw[at]
        if block == 0x2C:  # image descriptor: left, top, width, height, flags
            if at + 10 > len(raw):
                break
            left, top, width, height = struct.unpack("<HHHH", raw[at + 1:at + 9])
            right, bottom = max(right, left + width), max(bottom, top + height)
            flags = raw[at + 9]
            at += 10
            if flags & 0x80:  # local colour table
                at += 3 << ((flags & 7) + 1)
            at += 1  # LZW minimum code size
        elif block == 0x21:  # extension: label, then sub-blocks
            at += 2
        else:  # the trailer (0x3B), or not a GIF block
            break
        while at < len(raw) and steps < MAX_HEADER_STEPS:  # sub-blocks, to a zero length
            steps += 1
            length = raw[at]
            at += 1 + length
            if length == 0:
                break
    return right, bottom


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(raw: bytes) -> tuple[str, int, int] | None:
    at = 2
    steps = 0
    while at + 4 <= len(raw):
        steps += 1
        if steps > MAX_HEADER_STEPS:  # fill bytes or empty segments without end: not an image we read
            return None
        if raw[at] != 0xFF:
            return None
        marker = raw[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        length = int.from_bytes(raw[at + 2:at + 4], "big")
        if marker in _SOF:
            if at + 9 > len(raw):
                return None
            height, width = struct.unpack(">HH", raw[at + 5:at + 9])
            return "image/jpeg", width, height
        if marker == 0xDA or length < 2:  # image data before any frame header
            return None
        at += 2 + length
    return None
