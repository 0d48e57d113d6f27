"""The prefix cache's disk tier (``--prompt-cache-dir``): KV caches that leave RAM (evicted, or
the worker stopping) are written here, and a later prompt with that prefix, in the same scope,
restores one instead of prefilling it, also after the worker restarts.

Layout: ``DIR/<fingerprint>/<entry>.kv``, the directory 0700 and every file 0600. The fingerprint
(``model_fingerprint``) hashes what made the KV: the weights (names, sizes, times), the tokenizer
and chat template (contents), the KV bits and the device; a different or changed model gets
another directory and never reads this one's entries. An entry file is

    MAGIC | header length (8 bytes, little-endian) | SHA-256 of the header (32 bytes)
          | header (JSON: fingerprint, scope hash, tokens, the cache's classes and arrays' layout,
                    payload length and SHA-256)
          | payload (the arrays' raw bytes, one after another)

written under a temporary name and ``os.replace``d into place, so a reader sees a whole file or
none; a file that fails any check (header, fingerprint, length, payload digest) is deleted,
never used. The size limit (``max_bytes``) holds for everything under ``DIR``, least recently
used first out.

Threads: the engine thread calls ``lookup``/``spill``/``restore`` (cheap: the index is in memory;
``spill`` takes a contiguous copy of the arrays, evaluated); one writer thread serializes and
writes, one reader thread reads and checks, so file I/O never holds up the engine loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"MLXGWKV1"
FORMAT = 2
SUFFIX = ".kv"
_MAX_HEADER = 64 << 20
_PREFIX_LEN = len(MAGIC) + 8 + 32


def scope_hash(scope: str) -> str:
    return hashlib.sha256(f"scope|{scope}".encode()).hexdigest()


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _entry_name(scope: str, tokens: list[int]) -> str:
    return _entry_name_for_hash(scope_hash(scope), tokens)


# Files whose contents the fingerprint hashes (small: configs, tokenizer, template); every other
# file of the model directory (weights) counts by name, size and modification time.
_CONTENT_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                  "vocab.json", "merges.txt", "added_tokens.json", "model.safetensors.index.json"}


def model_fingerprint(model_dir: Path | None, chat_template: Any, kv_bits: int | None, extra: Iterable[str] = ()) -> str:
    """A hash of everything that decides a prompt's KV cache: the model directory's files, the
    chat template the tokenizer renders with, the KV bits, and ``extra`` (the device, ...)."""
    h = hashlib.sha256(f"mlx-gateway-kv|{FORMAT}|kv_bits={kv_bits}".encode())
    for item in extra:
        h.update(f"|{item}".encode())
    h.update(b"|template|" + json.dumps(chat_template, sort_keys=True, default=str).encode())
    if model_dir is not None:
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(model_dir).as_posix()
            st = path.stat()
            h.update(f"|file|{rel}|{st.st_size}".encode())
            if path.name in _CONTENT_FILES or st.st_size < (1 << 20):
                h.update(hashlib.sha256(path.read_bytes()).digest())
            else:
                h.update(f"|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


@dataclass
class DiskEntry:
    name: str
    scope: str  # scope_hash
    tokens: list[int]
    size: int  # bytes on disk
    trimmable: bool
    last_used: float


@dataclass
class Restored:
    """A disk entry read back and checked (reader thread), not yet MLX arrays."""

    entry: DiskEntry
    header: dict[str, Any]
    payload: bytes


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix (slice compares run in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class DiskCache:
    def __init__(self, root: Path, max_bytes: int, fingerprint: str, max_pending_bytes: int = 1 << 30):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint
        if not self.root.is_dir():  # an existing directory keeps its mode; ours are 0700
            _private_dir(self.root)
        _private_dir(self.dir)
        self._lock = threading.Lock()
        self._entries: dict[str, DiskEntry] = {}
        self._bytes = 0  # this fingerprint's entries
        self._others = 0  # other fingerprints' files under root, counted against the same limit
        self._pending: dict[str, int] = {}  # entry names queued for writing -> their bytes in memory
        self._max_pending = max_pending_bytes
        self.hits = 0  # restores that gave a cache
        self.writes = 0
        self.dropped = 0  # damaged or foreign files deleted
        self._writes: queue.Queue[tuple[str, str, list[int], bool, list[tuple[str, str, Any]], dict[str, Any]] | None] = (
            queue.Queue())
        self._idle = threading.Condition(self._lock)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-cache-read")
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="disk-cache-write", daemon=True)
        self._writer.start()

    # --- the index -------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _scan(self) -> None:
        """Rebuild the index from the files (headers only); drop leftovers of interrupted writes
        and files that fail their checks; then hold the size limit."""
        others: list[tuple[float, int, Path]] = []
        for sub in self.root.iterdir():
            if sub == self.dir or not sub.is_dir():
                continue
            for path in sub.iterdir():
                if path.is_file():
                    st = path.stat()
                    others.append((st.st_mtime, st.st_size, path))
        self._others = sum(size for _, size, _ in others)
        for path in self.dir.iterdir():
            if not path.is_file():
                continue
            if not path.name.endswith(SUFFIX):  # a write that never finished (unless its process still runs)
                if not _writer_alive(path.name):
                    _unlink(path)
                continue
            entry, _, _ = self._read_file(path)
            if entry is not None:
                self._entries[entry.name] = entry
                self._bytes += entry.size
        # Other models' entries go first: this worker cannot use them.
        for _, size, path in sorted(others, key=lambda o: o[0]):
            if self._bytes + self._others <= self.max_bytes:
                break
            _unlink(path)
            self._others -= size
        with self._lock:
            self._evict_locked(0)
        log.info("disk prompt cache %s: %d entries, %.1f MB", self.dir, len(self._entries), self._bytes / 1e6)

    def _read_file(self, path: Path, check_payload: bool = False) -> tuple[DiskEntry | None, dict[str, Any], bytes]:
        """An entry's header, checked (and its payload, read and checked, with ``check_payload``);
        (None, {}, b"") after deleting a bad file."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(_PREFIX_LEN)
                if len(head) != _PREFIX_LEN or head[:8] != MAGIC:
                    raise ValueError("not an entry file")
                length = int.from_bytes(head[8:16], "little")
                if length > _MAX_HEADER:
                    raise ValueError("header too long")
                raw = f.read(length)
                if len(raw) != length or _digest(raw) != head[16:48]:
                    raise ValueError("damaged header")
                header = json.loads(raw)
                if header.get("format") != FORMAT or header.get("fingerprint") != self.fingerprint:
                    raise ValueError("written by another model or format")
                if st.st_size != _PREFIX_LEN + length + int(header["payload_length"]):
                    raise ValueError("truncated or padded")
                tokens = header["tokens"]
                if not isinstance(tokens, list) or path.name != _entry_name_for_hash(header["scope"], tokens) + SUFFIX:
                    raise ValueError("misnamed")
                entry = DiskEntry(path.name, header["scope"], tokens, st.st_size, bool(header["trimmable"]),
                                  st.st_mtime)
                payload = b""
                if check_payload:
                    payload = f.read()
                    if len(payload) != int(header["payload_length"]) or _digest(payload).hex() != header["payload_digest"]:
                        raise ValueError("damaged payload")
                return entry, header, payload
        except FileNotFoundError:
            return None, {}, b""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("disk prompt cache: deleting %s: %s", path.name, exc)
            self.dropped += 1
            _unlink(path)
            return None, {}, b""

    def lookup(self, scope: str, prompt: list[int]) -> tuple[DiskEntry, int] | None:
        """The entry of ``scope`` that would supply the most of ``prompt`` (a prefix of it, or one
        sharing a longer prefix when it can be trimmed), and how many tokens; None if none."""
        key = scope_hash(scope)
        best: tuple[DiskEntry, int] | None = None
        with self._lock:
            candidates = [e for e in self._entries.values() if e.scope == key]
        for entry in candidates:
            common = _common_prefix(entry.tokens, prompt)
            if common < len(entry.tokens) and not entry.trimmable:
                continue
            usable = min(common, len(prompt) - 1)
            if usable > 1 and (best is None or usable > best[1]):
                best = (entry, usable)
        return best

    # --- reading ---------------------------------------------------------------------

    def restore(self, entry: DiskEntry) -> Future[Restored | None]:
        """Read and check ``entry`` on the reader thread."""
        return self._reader.submit(self._restore, entry)

    def _restore(self, entry: DiskEntry) -> Restored | None:
        path = self.dir / entry.name
        checked, header, payload = self._read_file(path, check_payload=True)
        if checked is None:
            self._forget(entry.name)
            return None
        now = time.time()
        try:
            os.utime(path, (now, now))
        except OSError:
            pass
        with self._lock:
            if entry.name in self._entries:
                self._entries[entry.name].last_used = now
            self.hits += 1
        return Restored(checked, header, payload)

    def _forget(self, name: str) -> None:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self._bytes -= entry.size

    # --- writing ---------------------------------------------------------------------

    def spill(self, scope: str, tokens: list[int], cache: list[Any]) -> bool:
        """On the engine thread: queue ``cache`` (the KV of ``tokens``) for writing. Evaluates it and
        exports its arrays' buffers here (the writer thread runs no MLX op; nothing is copied on
        this thread). False if it is on disk already or too much is queued."""
        if len(tokens) < 2:
            return False
        name = _entry_name(scope, tokens) + SUFFIX
        with self._lock:
            if name in self._pending:
                return False
            existing = self._entries.get(name)
            if existing is not None:
                existing.last_used = time.time()
                _touch(self.dir / name)
                return False
            nbytes = sum(int(getattr(c, "nbytes", 0)) for c in cache)
            if nbytes > self.max_bytes or sum(self._pending.values()) + nbytes > self._max_pending:
                return False
            self._pending[name] = nbytes
        try:
            arrays, metadata, trimmable = _serializable(cache)
        except Exception as exc:  # a cache type mlx-lm cannot save: not an error of the request's
            log.warning("disk prompt cache: cannot save this cache: %s", exc)
            with self._lock:
                self._pending.pop(name, None)
            return False
        self._writes.put((name, scope_hash(scope), list(tokens), trimmable, arrays, metadata))
        return True

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for queued writes; True if all were written."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        self._writes.put(None)
        self._reader.shutdown(wait=False, cancel_futures=True)

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                return
            name = item[0]
            try:
                self._write(*item)
            except Exception:
                log.exception("disk prompt cache: writing %s failed", name)
            finally:
                with self._idle:
                    self._pending.pop(name, None)
                    self._idle.notify_all()

    def _write(self, name: str, scope: str, tokens: list[int], trimmable: bool, arrays: list[tuple[str, str, Any]],
               metadata: dict[str, Any]) -> None:
        # The arrays' bytes through the buffer protocol: copying (numpy), hashing and writing them
        # release the GIL, so the engine thread runs on (mx.save_safetensors holds it throughout).
        import numpy as np

        views, layout, offset = [], [], 0
        digest = hashlib.sha256()
        for key, dtype, exported in arrays:
            flat = np.ascontiguousarray(np.asarray(exported))  # a slice of a batch's cache is strided
            shape = list(flat.shape)
            view = flat.data.cast("B")
            layout.append([key, dtype, shape, offset, view.nbytes])
            offset += view.nbytes
            digest.update(view)
            views.append(view)
        header = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "scope": scope, "tokens": tokens,
                             "trimmable": trimmable, "cache": metadata, "arrays": layout, "payload_length": offset,
                             "payload_digest": digest.hexdigest()}, separators=(",", ":")).encode()
        size = _PREFIX_LEN + len(header) + offset
        with self._lock:
            self._evict_locked(size)
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(8, "little") + _digest(header))
                f.write(header)
                for view in views:
                    f.write(view)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
            _fsync_dir(self.dir)
        except BaseException:
            _unlink(tmp)
            raise
        with self._lock:
            previous = self._entries.pop(name, None)
            if previous is not None:
                self._bytes -= previous.size
            self._entries[name] = DiskEntry(name, scope, tokens, size, trimmable, time.time())
            self._bytes += size
            self.writes += 1
            self._evict_locked(0)

    def _evict_locked(self, incoming: int) -> None:
        """Delete least recently used entries until ``incoming`` more bytes fit the limit."""
        while self._entries and self._bytes + self._others + incoming > self.max_bytes:
            oldest = min(self._entries.values(), key=lambda e: e.last_used)
            del self._entries[oldest.name]
            self._bytes -= oldest.size
            _unlink(self.dir / oldest.name)


def _entry_name_for_hash(scope_hex: str, tokens: list[int]) -> str:
    h = hashlib.sha256(scope_hex.encode())
    h.update(b"|")
    h.update(json.dumps(tokens, separators=(",", ":")).encode())
    return h.hexdigest()[:40]


def _serializable(cache: list[Any]) -> tuple[list[tuple[str, str, Any]], dict[str, Any], bool]:
    """On the engine thread: a cache's state as (key, dtype, a buffer of the evaluated array; bfloat16
    viewed as uint16, which numpy reads), what else rebuilds it (classes, other values of its
    state, meta state), and whether it can be trimmed. Nothing is copied here."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import can_trim_prompt_cache

    arrays: list[tuple[str, str, Any]] = []
    values: list[list[Any]] = []
    flat: Any = tree_flatten([c.state for c in cache])
    for key, value in flat:
        if isinstance(value, mx.array):
            dtype = str(value.dtype).rpartition(".")[2]
            arrays.append((key, dtype, value.view(mx.uint16) if value.dtype == mx.bfloat16 else value))
        elif value is None or isinstance(value, (bool, int, float, str)):
            values.append([key, value])
        else:
            raise ValueError(f"not serializable: {type(value).__name__}")
    mx.eval([array for _, _, array in arrays])
    arrays = [(key, dtype, memoryview(array)) for key, dtype, array in arrays]  # exported here, on MLX's thread
    metadata = {"classes": [f"{type(c).__module__}:{type(c).__name__}" for c in cache],
                "meta_state": [getattr(c, "meta_state", None) for c in cache], "values": values}
    return arrays, json.loads(json.dumps(metadata, default=str)), can_trim_prompt_cache(cache)


def load_cache(restored: Restored) -> list[Any]:
    """On the engine thread: a restored entry as mlx-lm cache objects (its arrays copied into MLX
    memory)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_unflatten

    header, payload = restored.header, restored.payload
    leaves: list[tuple[str, Any]] = []
    for key, dtype, shape, offset, nbytes in header["arrays"]:
        np_dtype = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
        data = np.frombuffer(payload, dtype=np_dtype, count=nbytes // np_dtype.itemsize, offset=offset)
        array = mx.array(data.reshape(shape))
        leaves.append((key, array.view(mx.bfloat16) if dtype == "bfloat16" else array))
    leaves += [(key, value) for key, value in header["cache"]["values"]]
    leaves.sort(key=lambda kv: [int(part) if part.isdigit() else part for part in kv[0].split(".")])
    states: Any = tree_unflatten(leaves)
    meta = header["cache"]
    restored_layers = []
    for i, qualified in enumerate(meta["classes"]):
        kind = _cache_class(qualified)
        state = states[i] if i < len(states) else []
        layer = kind.from_state(state)
        meta_state = meta["meta_state"][i]
        if meta_state not in (None, "", []) and hasattr(layer, "meta_state"):
            layer.meta_state = meta_state
        restored_layers.append(layer)
    mx.eval([layer.state for layer in restored_layers])
    return restored_layers


_CACHE_MODULES = ("mlx_lm.models.cache", "worker.quantized_cache")  # where a restored cache's class may come from


def _cache_class(qualified: str) -> Any:
    import importlib

    module, _, name = qualified.partition(":")
    if module not in _CACHE_MODULES:
        raise ValueError(f"unexpected cache class {qualified}")
    return getattr(importlib.import_module(module), name)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that named a temporary file ``.<entry>.<pid>.<thread>.tmp`` still runs."""
    parts = tmp_name.split(".")
    try:
        pid = int(parts[-3])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    """The rename itself survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("disk prompt cache: cannot delete %s: %s", path, exc)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def open_disk_cache(root: str, model_spec: str, loaded: Any, max_mb: float, kv_bits: int | None,
                    kv_group_size: int | None = None) -> DiskCache | None:
    """The disk tier for ``loaded`` (from ``--model model_spec``) under ``root``; None (logged)
    when the model's files cannot be found to fingerprint, or ``root`` cannot be used."""
    import mlx.core as mx

    from worker.models import resolve

    try:
        location, _ = resolve(model_spec)
        model_dir = Path(location)
        if not model_dir.is_dir():  # a hub id: mlx-lm's download
            from huggingface_hub import snapshot_download

            model_dir = Path(snapshot_download(location, local_files_only=True))
        tokenizer = loaded.tokenizer
        template = getattr(tokenizer, "chat_template", None)
        fingerprint = model_fingerprint(model_dir, template, kv_bits,
                                        extra=(f"group={kv_group_size if kv_bits is not None else None}",
                                               f"device={mx.default_device()}"))
        return DiskCache(Path(root).expanduser(), int(max_mb * (1 << 20)), fingerprint)
    except Exception as exc:
        log.error("--prompt-cache-dir %s not used: %s", root, exc)
        return None
