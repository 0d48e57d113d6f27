"""Stored responses, for ``previous_response_id``, retrieval, input items and item references.

Each stored response keeps its final object, its own input items, and its *context*: every
item the model saw before its output (earlier turns included), so a chain continues without
walking back through ancestors that may have been evicted. Both stores are bounded by count
and bytes and evict oldest first.

``SQLiteStore`` (the default) persists across gateway restarts. Its connection lives on one
dedicated thread, so database work never blocks the event loop. ``MemoryStore`` keeps
everything in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]
    # A hash of the API key that created it ("" with no keys): every other key gets None, as
    # if it did not exist. Items belong to their response's owner.
    owner: str = ""


# A background run the gateway lost (it stopped mid-run) reads as failed, never as missing.
INTERRUPTED = {"code": "gateway_restarted",
               "message": "The gateway stopped while this background response was running; run it again."}


def interrupted(response: dict[str, Any]) -> dict[str, Any]:
    """``response`` as it ends when its run was lost: failed, with what it had produced."""
    return {**response, "status": "failed", "error": INTERRUPTED}


class MemoryStore:
    def __init__(self, max_responses: int = 10_000, max_bytes: int = 512 << 20):
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._responses: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        # (owner, item id) -> (response id, item): item ids come from clients, so each key has its own
        self._items: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self._item_ids: dict[str, list[tuple[str, str]]] = {}  # response id -> its items' keys
        self._bytes = 0

    async def put(self, stored: StoredResponse) -> None:
        response_id = stored.response["id"]
        size = len(json.dumps(stored.response)) + len(json.dumps(stored.context))
        await self.delete(response_id)
        self._responses[response_id] = (stored, size)
        self._bytes += size
        items = [i for i in (*stored.input_items, *stored.response.get("output", [])) if i.get("id")]
        self._items.update(((stored.owner, item["id"]), (response_id, item)) for item in items)
        self._item_ids[response_id] = [(stored.owner, item["id"]) for item in items]
        while len(self._responses) > self.max_responses or (self._bytes > self.max_bytes and len(self._responses) > 1):
            await self.delete(next(iter(self._responses)))

    async def get(self, response_id: str, owner: str = "") -> StoredResponse | None:
        entry = self._responses.get(response_id)
        return entry[0] if entry and entry[0].owner == owner else None

    async def get_item(self, item_id: str, owner: str = "") -> dict[str, Any] | None:
        found = self._items.get((owner, item_id))
        return found[1] if found else None

    async def delete(self, response_id: str, owner: str | None = None) -> bool:
        """``owner`` None: whoever owns it (eviction)."""
        entry = self._responses.get(response_id)
        if entry is None or (owner is not None and entry[0].owner != owner):
            return False
        del self._responses[response_id]
        self._bytes -= entry[1]
        for key in self._item_ids.pop(response_id, []):
            if self._items.get(key, ("",))[0] == response_id:  # not if a later response holds it now
                self._items.pop(key, None)
        return True

    @property
    def size(self) -> int:
        return len(self._responses)

    async def count(self) -> int:
        return len(self._responses)

    async def fail_interrupted(self) -> int:
        """Nothing survives a restart in memory: nothing to mark."""
        return 0

    async def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    context TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_seq ON responses (seq);
CREATE TABLE IF NOT EXISTS owned_items (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    response_id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS owned_items_response ON owned_items (response_id);
"""
# Databases made before responses were scoped to their key gain the column (their rows: "").
_MIGRATIONS = ("ALTER TABLE responses ADD COLUMN owner TEXT NOT NULL DEFAULT ''",)
# Item ids come from clients: rows keyed by the id alone let one key's item replace another's.
# Databases made before then move their items into owned_items, each under its response's owner.
_ITEMS_MIGRATION = """
INSERT OR REPLACE INTO owned_items (owner, id, response_id, item)
    SELECT responses.owner, items.id, items.response_id, items.item
    FROM items JOIN responses ON responses.id = items.response_id;
DROP TABLE items;
"""


class SQLiteStore:
    def __init__(self, path: Path, max_responses: int = 10_000, max_bytes: int = 512 << 20):
        self.path = path
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")
        self._db: sqlite3.Connection  # opened by _open, on the store's thread
        self.size = 0  # responses stored, kept current by the store's thread (for /metrics)
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        _private_dir(self.path.parent)
        for suffix in ("", "-wal", "-shm"):  # the database and SQLite's files beside it
            _private_file(self.path.with_name(self.path.name + suffix), create=not suffix)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "owner" not in columns:
            for statement in _MIGRATIONS:
                self._db.execute(statement)
            self._db.commit()
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone():
            self._db.executescript("BEGIN;" + _ITEMS_MIGRATION + "COMMIT;")
        self.size = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def put(self, stored: StoredResponse) -> None:
        await self._run(self._put, stored)

    def _put(self, stored: StoredResponse) -> None:
        db = self._db
        response_id = stored.response["id"]
        response_json = json.dumps(stored.response)
        context_json = json.dumps(stored.context)
        size = len(response_json) + len(context_json)
        with db:
            self._delete(response_id)
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM responses").fetchone()
            db.execute("INSERT INTO responses (id, seq, size, response, input_items, context, owner) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (response_id, seq, size, response_json, json.dumps(stored.input_items), context_json,
                        stored.owner))
            db.executemany(
                "INSERT OR REPLACE INTO owned_items (owner, id, response_id, item) VALUES (?, ?, ?, ?)",
                [(stored.owner, item["id"], response_id, json.dumps(item))
                 for item in (*stored.input_items, *stored.response.get("output", [])) if item.get("id")],
            )
            while True:
                count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses").fetchone()
                if count <= self.max_responses and (total <= self.max_bytes or count <= 1):
                    break
                (oldest,) = db.execute("SELECT id FROM responses ORDER BY seq LIMIT 1").fetchone()
                self._delete(oldest)
            self.size = count

    async def get(self, response_id: str, owner: str = "") -> StoredResponse | None:
        return await self._run(self._get, response_id, owner)

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        row = self._db.execute("SELECT response, input_items, context FROM responses WHERE id = ? AND owner = ?",
                               (response_id, owner)).fetchone()
        if row is None:
            return None
        response, input_items, context = (json.loads(column) for column in row)
        return StoredResponse(response, input_items, context, owner)

    async def get_item(self, item_id: str, owner: str = "") -> dict[str, Any] | None:
        return await self._run(self._get_item, item_id, owner)

    def _get_item(self, item_id: str, owner: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT item FROM owned_items WHERE owner = ? AND id = ?", (owner, item_id)).fetchone()
        return json.loads(row[0]) if row else None

    async def delete(self, response_id: str, owner: str | None = None) -> bool:
        """``owner`` None: whoever owns it."""
        return await self._run(self._delete_committed, response_id, owner)

    def _delete_committed(self, response_id: str, owner: str | None) -> bool:
        with self._db:
            if owner is not None and self._get(response_id, owner) is None:
                return False
            deleted = self._delete(response_id)
        self.size -= int(deleted)
        return deleted

    def _delete(self, response_id: str) -> bool:
        deleted = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
        self._db.execute("DELETE FROM owned_items WHERE response_id = ?", (response_id,))
        return deleted > 0

    async def count(self) -> int:
        return await self._run(lambda: self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    async def fail_interrupted(self) -> int:
        """At start: background runs stored as queued or in progress were lost with the last
        gateway process; they become failed (``INTERRUPTED``). Returns how many."""
        return await self._run(self._fail_interrupted)

    def _fail_interrupted(self) -> int:
        rows = self._db.execute("SELECT id, response FROM responses WHERE json_extract(response, '$.status') "
                                "IN ('queued', 'in_progress')").fetchall()
        with self._db:
            for response_id, response in rows:
                self._db.execute("UPDATE responses SET response = ? WHERE id = ?",
                                 (json.dumps(interrupted(json.loads(response))), response_id))
        return len(rows)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)


def _private_dir(path: Path) -> None:
    """Stored prompts and outputs are for this user alone: the directory is 0700. An existing
    shared directory (sticky, like /tmp) or one of another user is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.getuid() and not info.st_mode & stat.S_ISVTX:
        path.chmod(0o700)


def _private_file(path: Path, create: bool) -> None:
    """0600, created so (never readable by others for a moment); SQLite gives its -wal and -shm
    files the database's mode."""
    if create and not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if path.exists():
        path.chmod(0o600)


ResponseStore = MemoryStore | SQLiteStore
