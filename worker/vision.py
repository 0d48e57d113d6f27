"""A vision-language worker: images in, through mlx-vlm's vision tower, into mlx-lm's batching.

Why this design (mlx-vlm 0.7.10, mlx-lm 0.32.2, measured and read here): mlx-vlm has its own
``generate``, ``batch_generate`` and a continuous ``BatchGenerator``, with its own cache classes and
prefix cache. On the tests' tiny LLaVA with transformers 5.24, ``generate`` and ``batch_generate``
fail in its input preparation (``ImagesKwargs.__init__() got an unexpected keyword argument
'padding'``), and its ``BatchGenerator`` is a second engine beside ``worker/engine.py``: adopting it
would lose (or duplicate) this worker's scheduling (chunked prefill interleaved with decoding), the
prefix cache and its disk tier, quantized KV caches, structured output, tool-call parsing and
speculative decoding, all built on mlx-lm's ``BatchGenerator``. So the vision worker keeps that
engine, and changes only what the model sees at prefill (the model's processor is still called the
way that works, ``processor(text=..., images=...)``):

- **The language model is mlx-lm's.** The VLM's text weights are loaded into mlx-lm's class for
  its ``text_config.model_type`` (llama, qwen2, mistral, ...), sharing the arrays mlx-vlm loaded
  (quantized layers quantized the same way), so ``BatchGenerator``, its batch caches and masks run
  unchanged.
- **Image tokens are virtual token ids.** The model's processor expands each image into its image
  tokens; each of those becomes an id above the vocabulary, ``VIRTUAL_BASE`` + 30 bits of a hash of
  (the caller's cache scope and the image's SHA-256, the token's index within the image), distinct
  within the image. ``ImageEmbeddingModel`` (worker/image_features.py) wraps the
  language model: a step whose input holds such ids gets its input embeddings built from the text
  embeddings with those rows replaced by the image's features (the vision tower's output after the
  projector: mlx-vlm's own ``get_input_embeddings`` merge, read back at the image positions).
- **So the prefix cache needs no change.** Its keys are the token ids, and the ids of an image are
  a function of its bytes and its caller (a processor that cuts an image into tiles, Idefics3's, gives several
  runs of image tokens: then they are keyed by all the request's images together): the same image
  (in a later turn of a conversation, or another request) hits, a different image diverges at its
  first image token and never hits. The same holds on the disk tier, across restarts. (Two
  different images share a first token id with probability 2^-30; then one token's cache entry
  would be reused; nothing beyond it. In the feature table an id belongs to one live image only:
  ``FeatureTable``, worker/image_features.py.)
- **Preprocessing** (decoding the image, the processor's resize and normalisation, the chat
  template) runs on the prompt-builder thread with the text prompt; the **vision tower** runs on
  the engine thread when the request is queued (``enqueue``), once per distinct image: features
  are kept in a table (LRU, ``FEATURE_CACHE_BYTES``) so an image sent again is not encoded again.

Supported: VLMs whose language model takes plain 1-D positions (``SUPPORTED``: LLaVA, and Idefics3 /
SmolVLM, whose text model is llama). Qwen2-VL / Qwen2.5-VL (M-RoPE: three-axis positions that
depend on the image grid) and Gemma 3 (bidirectional attention over image tokens) need positions
or masks that mlx-lm's batch caches do not carry: they are refused when the worker loads, not run
wrongly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from protocol.messages import ERROR_INVALID_REQUEST, Accepted, Error, Generate
from worker.engine import Engine, Sequence, StepResult
from worker.gguf import ModelLoadError
from worker.image_features import FeatureError, FeatureTable, ImageEmbeddingModel
from worker.models import BUILTIN_MODELS, FALLBACK_SAMPLING, LoadedModel, _model_sampling, resolve
from worker.prompts import (
    CLIENT_TEMPLATE,
    ClientTemplateRefused,
    PromptBuilder,
    render_traced,
    render_watched,
    template_message,
)

log = logging.getLogger(__name__)

# mlx-vlm model types whose language model runs on mlx-lm's classes with 1-D positions.
SUPPORTED = {"llava", "idefics3", "smolvlm"}
REFUSED = {
    "qwen2_vl": "M-RoPE (three-axis positions from the image grid)",
    "qwen2_5_vl": "M-RoPE (three-axis positions from the image grid)",
    "qwen3_vl": "M-RoPE (three-axis positions from the image grid)",
    "gemma3": "bidirectional attention over image tokens",
}
VIRTUAL_BASE = 1 << 30  # image token ids: VIRTUAL_BASE + 30 bits (int32, above any vocabulary)
MAX_DECODED_PIXELS = 2 * 7680 * 4320  # beyond the gateway's default limit (8K UHD), checked again once opened
FEATURE_CACHE_BYTES = 512 << 20  # image features kept for images sent again (pinned ones beyond it)


class ImageError(ValueError):
    """An image the worker cannot read (the request fails with invalid_request)."""


def is_vision_model(spec: str) -> bool:
    """Whether ``--model`` is a vision-language model directory (its config.json has a vision_config)."""
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS or spec.endswith(".gguf") or not path.is_dir():
        return False  # a hub id: ``worker --vision`` says so
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "vision_config" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def has_images(request: Generate) -> bool:
    return any(_image_parts(message) for message in request.messages or ())


def _image_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [part for part in content if isinstance(part, dict) and part.get("type") == "image"]


# --- the model ------------------------------------------------------------------------


@dataclass
class VisionParts:
    """What the vision worker holds beside the language model."""

    vlm: Any  # mlx-vlm's Model (its vision tower and projector are used; its LM shares arrays with ours)
    processor: Any  # the model's processor (image processor + tokenizer)
    image_token_id: int
    features: FeatureTable


@dataclass
class VisionLoadedModel(LoadedModel):
    vision: VisionParts | None = None


def load_vision(spec: str, served_name: str | None = None, context_length: int | None = None,
                sampling: dict[str, float] | None = None) -> VisionLoadedModel:
    """Load a VLM directory (or hub id mlx-vlm can fetch) for the vision worker."""
    try:
        from mlx_lm.utils import _get_classes, dequantize_model, load_tokenizer
        from mlx_vlm.utils import get_model_path
        from mlx_vlm.utils import load as vlm_load
    except ImportError as exc:
        raise ModelLoadError(f"a vision model needs mlx-vlm: pip install 'mlx-gateway[vision]' ({exc})") from None
    location, default_name = resolve(spec)
    path = get_model_path(location)
    raw = json.loads((Path(path) / "config.json").read_text())
    kind = raw.get("model_type")
    if kind in REFUSED:
        raise ModelLoadError(f"{spec}: {kind} is not served by this worker: its language model needs {REFUSED[kind]}, "
                             "which mlx-lm's batching does not carry (see worker/vision.py)")
    if kind not in SUPPORTED:
        raise ModelLoadError(f"{spec}: vision model type {kind!r} is not supported here (supported: "
                             f"{', '.join(sorted(SUPPORTED))})")
    log.info("loading %s (vision: mlx-vlm %s)", path, kind)
    try:
        vlm, processor = vlm_load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load {spec!r} with mlx-vlm: {type(exc).__name__}: {exc}") from None
    text_config = _text_config(vlm, raw)
    try:
        model_class, args_class = _get_classes(text_config)
    except Exception as exc:
        raise ModelLoadError(f"{spec}: mlx-lm has no model for its text_config "
                             f"({text_config.get('model_type')!r}): {exc}") from None
    if mx.default_device() == mx.cpu:
        # As worker/models.py: float32 matmul beats quantized matmul on the CPU. Converted before the
        # language model is built from it, so the two share the text weights' arrays.
        vlm = dequantize_model(vlm)
        vlm.set_dtype(mx.float32)
        mx.eval(vlm.parameters())
        log.info("CPU device: weights dequantized to float32")
    language = model_class(args_class.from_dict(text_config))
    source = vlm.language_model
    quantized = {name: module for name, module in source.named_modules() if hasattr(module, "bits")}
    if quantized:
        def predicate(name: str, _module: nn.Module) -> bool | dict[str, Any]:
            q = quantized.get(name)
            return {"group_size": q.group_size, "bits": q.bits, "mode": getattr(q, "mode", "affine")} if q else False

        nn.quantize(language, class_predicate=predicate)
    from mlx.utils import tree_flatten

    try:
        language.load_weights(_renamed(tree_flatten(source.parameters()), tree_flatten(language.parameters())),
                              strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"{spec}: its language model's weights do not fit mlx-lm's "
                             f"{text_config.get('model_type')} model: {exc}") from None
    tokenizer = load_tokenizer(Path(path), eos_token_ids=raw.get("eos_token_id") or text_config.get("eos_token_id"))
    _adopt_processor_template(tokenizer, processor, Path(path))
    image_token_id = _image_token_id(vlm, raw, processor)
    vocab = int(text_config.get("vocab_size") or len(processor.tokenizer))
    if vocab >= VIRTUAL_BASE:
        raise ModelLoadError(f"{spec}: a vocabulary of {vocab} tokens leaves no room for image token ids")
    features = FeatureTable(FEATURE_CACHE_BYTES)
    wrapper = ImageEmbeddingModel(language, vocab, features)
    limit = context_length or int(text_config.get("max_position_embeddings") or raw.get("max_position_embeddings")
                                  or 4096)
    defaults = {**FALLBACK_SAMPLING, **_model_sampling(spec, str(path)), **(sampling or {})}
    return VisionLoadedModel(served_name or default_name, wrapper, tokenizer, limit, defaults,
                             vision=VisionParts(vlm, processor, image_token_id, features))


def _adopt_processor_template(tokenizer: Any, processor: Any, path: Path) -> None:
    """A VLM whose chat template is its processor's only (``chat_template.json``, beside a tokenizer
    with none): the tokenizer gets it, for every prompt (and as the model's own template)."""
    if getattr(tokenizer, "chat_template", None):
        return
    template = getattr(processor, "chat_template", None)
    file = path / "chat_template.json"
    if not template and file.is_file():
        try:
            template = json.loads(file.read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError, AttributeError):
            template = None
    if template:
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = template


def _renamed(source: Any, target: Any) -> list[tuple[str, Any]]:
    """The VLM's language weights under mlx-lm's names: mlx-vlm's Idefics3 language model keeps its
    layers at the top (``layers.0...``) where mlx-lm's llama has them under ``model.``; a tied model's
    own ``lm_head`` (where mlx-lm ties it to the embeddings) is left out."""
    names = {name for name, _ in target}
    out = []
    for name, value in source:
        if name not in names and f"model.{name}" in names:
            name = f"model.{name}"
        elif name not in names and name.startswith("lm_head.") and not any(n.startswith("lm_head.") for n in names):
            continue
        out.append((name, value))
    return out


def _text_config(vlm: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's config for mlx-lm: mlx-vlm's (its defaults filled in) over the file's."""
    text = dict(raw.get("text_config") or {})
    parsed = getattr(vlm.config, "text_config", None)
    if dataclasses.is_dataclass(parsed):
        text.update({k: v for k, v in dataclasses.asdict(parsed).items() if v is not None})  # type: ignore[arg-type]
    text.setdefault("vocab_size", raw.get("vocab_size"))
    text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    return text


def _image_token_id(vlm: Any, raw: dict[str, Any], processor: Any) -> int:
    config = vlm.config
    parsed: dict[str, Any] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(
        config, type) else {}
    for source in (raw, parsed):
        for name in ("image_token_index", "image_token_id"):
            if isinstance(source.get(name), int):
                return int(source[name])
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    raise ModelLoadError("cannot tell the model's image token (no image_token_index in config.json)")


# --- prompts ------------------------------------------------------------------------


@dataclass
class PreparedImages:
    """A request's images after preprocessing (the prompt-builder thread), for the vision tower."""

    input_ids: np.ndarray  # the processor's ids (image tokens as the model's image token)
    pixels: dict[str, np.ndarray]  # the processor's image inputs (pixel_values, masks, sizes)
    groups: list[tuple[str, np.ndarray, np.ndarray]]  # (image key, positions in the prompt, virtual ids)
    preprocess_s: float = 0.0
    encode_s: float = 0.0
    images: int = 0


class VisionPromptBuilder(PromptBuilder):
    """Prompts with images: the chat template renders the model's image placeholders, the model's
    processor expands them and prepares the pixels, and image tokens become virtual ids.

    Every message's content reaches the template as parts (``{"type": "text", ...}``, ``{"type":
    "image"}``), text-only requests' too: VLM templates (SmolVLM's, Idefics3's, LLaVA's) loop over
    content parts and render a plain string as nothing. The template writes any BOS itself, so the
    prompt is tokenized without special tokens on both paths. A request's images, once prepared,
    are left for ``take_prepared`` (the same thread: ``VisionEngine.prepare`` carries them on the
    request's Sequence)."""

    def __init__(self, base: PromptBuilder, parts: VisionParts):
        super().__init__(base.tokenizer, base.tool_format, base.policy)
        self.parts = parts
        self._local = threading.local()  # .prepared: the images of the request this thread just built

    def take_prepared(self) -> PreparedImages | None:
        prepared = getattr(self._local, "prepared", None)
        self._local.prepared = None
        return prepared

    def tokenize(self, request: Generate, forced_tool_call: bool) -> list[int]:
        self._local.prepared = None
        if request.messages is None:
            return super().tokenize(request, forced_tool_call)
        started = time.perf_counter()
        client_template = self.client_template(request)
        if client_template is not None and not self.policy.allow_client_templates:
            raise ClientTemplateRefused(
                f"{CLIENT_TEMPLATE}: this worker does not render templates sent by clients (its operator can "
                "allow them with the worker flag --allow-client-templates); leave it out to use the model's own")
        images: list[tuple[str, Any]] = []
        messages = []
        for message in request.messages or ():
            content = message.get("content")
            if isinstance(content, str):
                message = {**message, "content": [{"type": "text", "text": content}]}
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        images.append(_decode_image(part, len(images)))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": str(part.get("text") or "")})
                message = {**message, "content": parts}
            messages.append(template_message(message))
        tokenizer = self.tokenizer

        def render() -> str:
            return tokenizer.apply_chat_template(messages, tools=request.tools or None, add_generation_prompt=True,
                                                 tokenize=False, **request.chat_template_kwargs)

        bounded = render_traced if client_template is not None else render_watched
        text = bounded(render, self.policy.timeout)
        if forced_tool_call and self.tool_format is not None:
            text += self.tool_format.forced_prefix
        if not images:
            return list(tokenizer.encode(text, add_special_tokens=False))  # the template writes any BOS
        # The processor tokenizes with the tokenizer's special tokens (mlx-vlm's processors take no
        # add_special_tokens): the ones it added beyond the template's text are taken off again.
        outputs = self.parts.processor(text=[text], images=[image for _, image in images], return_tensors="np")
        input_ids = self._without_added_specials(np.asarray(outputs["input_ids"]).reshape(-1).astype(np.int64),
                                                 tokenizer.encode(text, add_special_tokens=False))
        pixels = {name: np.asarray(value) for name, value in outputs.items()
                  if name not in ("input_ids", "attention_mask") and value is not None}
        groups = _image_groups(input_ids, self.parts.image_token_id,
                               [_scoped(request.cache_scope, key) for key, _ in images])
        tokens = input_ids.copy()
        for _, positions, ids in groups:
            tokens[positions] = ids
        self._local.prepared = PreparedImages(input_ids, pixels, groups, time.perf_counter() - started,
                                              images=len(images))
        return [int(t) for t in tokens]

    def _without_added_specials(self, input_ids: np.ndarray, plain: list[int]) -> np.ndarray:
        """``input_ids`` less the special tokens the tokenizer adds around a text (a BOS before it, an
        EOS after it), where the processor added them: as the text path's ``add_special_tokens=False``
        (the template writes any BOS itself: never two)."""
        prefix, suffix = self._specials()
        ids = input_ids.tolist()
        if prefix and plain and ids[:len(prefix) + 1] == [*prefix, plain[0]]:
            input_ids = input_ids[len(prefix):]
        if suffix and plain and ids[-len(suffix) - 1:] == [plain[-1], *suffix]:
            input_ids = input_ids[:-len(suffix)]
        return input_ids

    def _specials(self) -> tuple[list[int], list[int]]:
        found = getattr(self, "_added_specials", None)
        if found is None:
            bare = list(self.tokenizer.encode("a", add_special_tokens=False))
            full = list(self.tokenizer.encode("a", add_special_tokens=True))
            found = ([], [])
            for at in range(len(full) - len(bare) + 1):
                if full[at:at + len(bare)] == bare:
                    found = (full[:at], full[at + len(bare):])
                    break
            self._added_specials = found
        return found


def _scoped(scope: str, image_key: str) -> str:
    """An image's feature-table key (and so its virtual ids): the caller's cache scope with the image's
    SHA-256, so that the same image sent by two callers shares neither features nor timing."""
    return hashlib.sha256(f"{scope}\0{image_key}".encode()).hexdigest()


def _decode_image(part: dict[str, Any], index: int) -> tuple[str, Any]:
    """(the image's key: SHA-256 of its bytes, the decoded RGB image)."""
    from PIL import Image

    data = part.get("data")
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"image {index + 1}: no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ImageError(f"image {index + 1} could not be decoded: {exc}") from None
    width, height = image.size  # as decoded (a GIF grows to a first frame larger than its header says)
    if width * height > MAX_DECODED_PIXELS:
        raise ImageError(f"image {index + 1} is {width}x{height} pixels decoded, more than this worker decodes "
                         f"({MAX_DECODED_PIXELS:,} pixels)")
    try:
        image.load()
    except Exception as exc:
        raise ImageError(f"image {index + 1} could not be decoded: {exc}") from None
    return hashlib.sha256(bytes(data)).hexdigest(), image.convert("RGB")


def _image_groups(input_ids: np.ndarray, image_token: int, keys: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The image token positions of each image, with their virtual ids. One run of image tokens per
    image (LLaVA) maps run i to image i; a processor that splits an image into several runs (Idefics3's
    tiles) keys all of the prompt's image tokens by all its images together (still exact: the same
    images hit, any different image misses; only a later turn adding an image misses from the first)."""
    positions = np.flatnonzero(input_ids == image_token)
    if positions.size == 0:
        raise ImageError("the chat template placed no image in the prompt")
    runs = np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1)
    if len(runs) == len(keys):
        groups = list(zip(keys, runs, strict=True))
    else:
        groups = [(hashlib.sha256("|".join(keys).encode()).hexdigest(), positions)]
    return [(key, where, virtual_ids(key, len(where))) for key, where in groups]


def virtual_ids(key: str, count: int) -> np.ndarray:
    """The virtual token ids of an image's ``count`` tokens: a function of its key alone."""
    seed = bytes.fromhex(key)
    out = np.empty(count, dtype=np.int64)
    seen: set[int] = set()
    for index in range(count):
        salt = b""
        while True:  # distinct within the image: each id is one feature row
            digest = hashlib.blake2b(seed + index.to_bytes(4, "little") + salt, digest_size=4).digest()
            token = VIRTUAL_BASE + (int.from_bytes(digest, "little") & (VIRTUAL_BASE - 1))
            if token not in seen:
                break
            salt = (int.from_bytes(salt or b"\0", "little") + 1).to_bytes(4, "little")
        seen.add(token)
        out[index] = token
    return out


# --- the engine -----------------------------------------------------------------------


class VisionEngine(Engine):
    """The text engine, with images: the vision tower runs when a request with images is queued,
    its features are pinned until the request's prefill ends, and penalties skip image ids."""

    vision = True

    def __init__(self, loaded: LoadedModel, *args: Any, **kwargs: Any):
        super().__init__(loaded, *args, **kwargs)
        parts = getattr(loaded, "vision", None)
        if parts is None:
            raise ValueError("VisionEngine needs a model from load_vision")
        self.parts: VisionParts = parts
        self.vision_prompts = VisionPromptBuilder(self.prompts, parts)
        self.prompts = self.vision_prompts
        self._pinned: dict[str, list[str]] = {}  # request id -> the image keys it pinned
        self.timings: dict[str, PreparedImages] = {}  # the last requests' figures (bench/images.py)

    def count(self, request: Generate) -> Accepted | Error:
        counted = super().count(request)
        self.vision_prompts.take_prepared()
        return counted

    def prepare(self, request: Generate) -> Sequence | Error:
        """As the text engine's; the request's prepared images travel on its Sequence (``images``)."""
        self.vision_prompts.take_prepared()
        prepared = super().prepare(request)
        images = self.vision_prompts.take_prepared()
        if isinstance(prepared, Sequence):
            prepared.images = images  # type: ignore[attr-defined]
        return prepared

    def enqueue(self, sequence: Sequence) -> Accepted | Error:
        request_id = sequence.request.request_id
        if request_id in self._by_request or request_id in self._pinned:
            return super().enqueue(sequence)  # a duplicate id: refused, and the first one's pins stay
        images: PreparedImages | None = getattr(sequence, "images", None)
        vocab = int(self.loaded.model.vocab_size)
        if images is None:
            if any(token >= vocab for token in sequence.prompt):
                return Error(ERROR_INVALID_REQUEST, "the prompt holds image tokens but its images were not prepared",
                             request_id)
        else:
            pinned: list[str] = []
            self._pinned[request_id] = pinned
            try:
                for key, _, ids in images.groups:  # pinned before put: encoding cannot evict them
                    self.parts.features.pin(key, ids)
                    pinned.append(key)
                self._encode(images)
            except FeatureError as exc:
                self._unpin(request_id)
                return Error(ERROR_INVALID_REQUEST, f"the images could not be used: {exc}", request_id)
            except Exception as exc:
                self._unpin(request_id)
                log.exception("the vision tower failed")
                return Error(ERROR_INVALID_REQUEST, f"the images could not be encoded: {exc}", request_id)
            self._keep_timings(request_id, images)
        reply = super().enqueue(sequence)
        if isinstance(reply, Error):
            self._unpin(request_id)
        return reply

    def _encode(self, images: PreparedImages) -> None:
        """Run the vision tower (and the projector) for the images not in the feature table."""
        table = self.parts.features
        if all(key in table for key, _, _ in images.groups):
            return
        started = time.perf_counter()
        vlm = self.parts.vlm
        input_ids = mx.array(images.input_ids[None])
        kwargs = {name: mx.array(value) for name, value in images.pixels.items()}
        pixel_values = kwargs.pop("pixel_values", None)
        merged = vlm.get_input_embeddings(input_ids, pixel_values, **kwargs)
        embeds = getattr(merged, "inputs_embeds", merged)[0]
        for key, positions, ids in images.groups:
            rows = embeds[mx.array(positions)]
            mx.eval(rows)
            table.put(key, ids, rows)
        images.encode_s = time.perf_counter() - started

    def _keep_timings(self, request_id: str, images: PreparedImages) -> None:
        self.timings[request_id] = PreparedImages(images.input_ids[:0], {}, [], images.preprocess_s, images.encode_s,
                                                  images.images)
        while len(self.timings) > 64:
            del self.timings[next(iter(self.timings))]
        log.info("%d image(s): preprocessing %.1f ms, vision encoder %.1f ms", images.images,
                 images.preprocess_s * 1000, images.encode_s * 1000, extra={"request_id": request_id})

    def _unpin(self, request_id: str) -> None:
        for key in self._pinned.pop(request_id, ()):
            self.parts.features.unpin(key)

    def _prompts_prefilled(self, uids: list[int]) -> None:
        super()._prompts_prefilled(uids)
        for uid in uids:
            sequence = self._running.get(uid)
            if sequence is not None:
                self._unpin(sequence.request.request_id)

    def _finished(self, sequence: Sequence, reason: str) -> Any:
        self._unpin(sequence.request.request_id)
        return super()._finished(sequence, reason)

    def step(self) -> StepResult:
        result = super().step()
        for error in result.errors:
            if error.request_id is not None:
                self._unpin(error.request_id)
        return result

    def _processors(self, request: Generate) -> list[Any]:
        """Presence and frequency penalties index logits by the tokens seen: image ids are left out."""
        processors = super()._processors(request)
        sampling = request.sampling
        if not (sampling.presence_penalty or sampling.frequency_penalty) or request.request_id not in self._pinned:
            return processors
        from mlx_lm.sample_utils import make_logits_processors

        penalties = len(make_logits_processors(presence_penalty=sampling.presence_penalty,
                                               frequency_penalty=sampling.frequency_penalty))
        vocab = int(self.loaded.model.vocab_size)
        return [_text_tokens_only(p, vocab) for p in processors[:penalties]] + processors[penalties:]


def _text_tokens_only(processor: Any, vocab: int) -> Any:
    def apply(tokens: Any, logits: mx.array) -> mx.array:
        if len(tokens) and mx.max(tokens).item() >= vocab:  # type: ignore[operator]
            tokens = mx.array([t for t in tokens.tolist() if t < vocab], dtype=mx.int32)
        return processor(tokens, logits)

    return apply
