"""Random ids with a vendor's prefix: ``resp_…``, ``msg_…``, ``toolu_…``, ``chatcmpl-…``."""

from __future__ import annotations

import uuid


def new_id(prefix: str, length: int = 32, separator: str = "_") -> str:
    return f"{prefix}{separator}{uuid.uuid4().hex[:length]}"
