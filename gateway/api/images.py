"""Image input, read the same way for every API family, with the operator's limits.

Each family finds its images in its own shape (Responses ``input_image``, Chat ``image_url``
parts, Messages ``image`` blocks) and turns each into an ``ImagePart`` here: the image's bytes and
media type, checked against the limits (``gateway --max-image-mb``, ``--max-image-pixels``,
``--max-images``), each failure a 400 naming the field. Images travel to the worker as bytes inside
the message's content parts (``request.template_message``); a text-only worker refuses them.

- ``data:`` URLs and base64 sources are read here; ``http(s)://`` URLs are refused unless the
  operator passes ``gateway --allow-image-urls`` (a server that fetches any URL it is given can be
  turned against the network it sits in). When allowed, the fetch has a timeout
  (``--image-url-timeout``) and stops at the byte limit; it runs while the request is read, so it
  holds that request's handling (and the gateway's event loop) for up to the timeout: allow it on a
  gateway whose clients you trust.
- Pixels: width × height read from the image's header (PNG, JPEG, GIF, WebP; nothing is decoded
  here), so an image that would decode to gigabytes is refused before any work.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass

from gateway.api.errors import APIError

DEFAULT_MAX_IMAGE_BYTES = 20 << 20
DEFAULT_MAX_IMAGE_PIXELS = 7680 * 4320  # 8K UHD
DEFAULT_MAX_IMAGES = 50
DEFAULT_URL_TIMEOUT = 10.0
MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


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
    import httpx

    limit = _limits.max_bytes
    try:
        with httpx.Client(timeout=_limits.url_timeout, follow_redirects=True, max_redirects=3) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise APIError(400, f"fetching the image failed: HTTP {response.status_code}", param=param)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise APIError(400, f"the image is larger than this server's limit of {_size(limit)} "
                                   "(gateway --max-image-mb)", param=param, code="image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise APIError(400, f"fetching the image failed: {type(exc).__name__}", param=param) from None
    return checked(b"".join(chunks), None, param)


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
        return "image/gif", width, height
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


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(raw: bytes) -> tuple[str, int, int] | None:
    at = 2
    while at + 4 <= len(raw):
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
