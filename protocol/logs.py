"""One log line per event, the same way in both processes: human-readable or JSON.

A log call passes the request it is about as ``extra={"request_id": ...}`` (the worker), or the
gateway sets ``current_request_id`` for the HTTP request being served; either way the id shows
up in the line, so grepping one id finds a request in the gateway's and the worker's logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


class _HumanFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__(f"%(asctime)s {process}[%(process)d] %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        return super().format(record)


class _JSONFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self._process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(process: str, level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records to stderr, one line each, as ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter(process) if fmt == "json" else _HumanFormatter(process))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
