"""The ``signature`` of our thinking blocks: the thinking itself, base64 behind a prefix.

Clients send thinking blocks back untouched. With ``thinking.display: "omitted"`` (Claude Code
asks for it) a block's text is empty and the thinking travels only in its signature, as
Anthropic's does (encrypted there); ``convert.py`` reads it back. It guarantees nothing beyond
that round trip: it is not signed, and a client can write one.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

_PREFIX = "mlxgw1."


def thinking_signature(thinking: str) -> str:
    return _PREFIX + base64.b64encode(thinking.encode()).decode()


def thinking_from_signature(signature: Any) -> str:
    """The thinking one of our signatures carries; "" for any other (e.g. Anthropic's own)."""
    if not isinstance(signature, str) or not signature.startswith(_PREFIX):
        return ""
    try:
        return base64.b64decode(signature[len(_PREFIX):], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
