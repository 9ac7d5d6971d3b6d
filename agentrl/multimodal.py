"""Images for vision-language policies: the processor, the image blocks in the token stream, the
pixel inputs the model sees, and how they are stored with a trajectory.

The contract (the HF engine follows it; another engine or the verl agent loop can follow it too):

- A trajectory's token ids already hold each image's *expanded* block of placeholder tokens, as the
  model's processor writes it (for Idefics3/SmolVLM ``<fake_token_around_image><row_1_col_1><image>
  ...<global-img><image>...<fake_token_around_image>``), with loss mask 0.
- :class:`ImageInputs` travels with the ids: the images in the order their blocks appear, and for each
  the processor's tensors for that image alone (``pixel_values``, ``pixel_attention_mask``, ...).
  :func:`model_inputs` stacks them into the keyword arguments of the model's forward pass. A vLLM
  engine passes ``ImageInputs.images`` as ``multi_modal_data={"image": images}`` beside the token
  ids; verl's agent loop returns them as ``multi_modal_data={"images": images}``.
- Every image the model saw is kept in ``Trajectory.images`` as an :class:`ImageRecord`: the image
  itself (base64 PNG inline, or a file by reference) and the SHA-256 of its processed tensors. The
  tensors are cached on the trajectory object while it lives in the process; a trajectory read back
  from JSONL gets them again from the stored image and the same processor
  (:func:`trajectory_image_inputs`), and the digest proves they are exactly those the engine saw.

Tests and the CPU smoke run use ``tiny-smolvlm``: a randomly initialised Idefics3 (the SmolVLM
architecture) built offline from its config, with the embedded SmolLM2 tokenizer and the real
Idefics3 image processor (:func:`build_tiny_vision_model`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentrl.trajectory import ImageRecord, Trajectory

TINY_VISION_MODEL = "tiny-smolvlm"
# Models whose forward takes pixel inputs beside ordinary 1-D positions, as the HF engine and the
# trainer's forward pass give them (Qwen2-VL's M-RoPE positions would need computing per row).
SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm")

# ChatML (as SmolLM2 uses it) that also renders list content: {"type": "image"} items become the
# processor's placeholder, {"type": "text"} items their text. String content renders as it is.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)
]


# -- the processor of a tokenizer ------------------------------------------------------------------

_PROCESSORS: dict[int, tuple[Any, Any]] = {}
_LOCK = threading.Lock()
_LAST: list[Any] = []  # the processor attached last: restores stored trajectories where none is named


def attach_processor(tokenizer: Any, processor: Any) -> None:
    """Make ``processor`` the one :func:`processor_for` finds for ``tokenizer`` (the rollout and the
    trainer are handed the tokenizer; a vision-language model's loader attaches its processor)."""
    with _LOCK:
        _PROCESSORS[id(tokenizer)] = (tokenizer, processor)  # the tokenizer is held so its id stays its own
        _LAST[:] = [processor]


def processor_for(tokenizer: Any) -> Any | None:
    """The processor attached to ``tokenizer``, or ``None`` for a text-only model."""
    entry = _PROCESSORS.get(id(tokenizer))
    return entry[1] if entry is not None and entry[0] is tokenizer else None


# -- models ------------------------------------------------------------------------------------------


def is_vision_model_dir(path: str | Path) -> bool:
    """A model directory whose config has a vision tower (Idefics3, SmolVLM, Qwen2-VL, ...)."""
    config = Path(path) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text(encoding="utf-8"))


def build_tiny_vision_model(tokenizer: Any, seed: int = 0, hidden_size: int = 64, image_size: int = 32):
    """A randomly initialised Idefics3 (SmolVLM) over ``tokenizer`` (SmolLM2's), and its processor.

    The text model is a 2-layer Llama; the vision tower a 1-layer SigLIP over ``image_size`` tiles
    of 8x8 patches; pixel shuffle by 2 makes 4 image tokens per tile. The image processor is the
    real Idefics3 one: an image is resized to a longest edge of ``2 * image_size``, split into
    tiles of ``image_size`` plus a global view, each with its row/column tag.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    # from its module: transformers < 5.11's lazy top-level name asks for torchvision, which the class does not use
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
        do_image_splitting=True)
    patch_size, scale_factor = 8, 2
    tokens_per_tile = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=tokens_per_tile,
                                  chat_template=VISION_CHAT_TEMPLATE)
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=hidden_size * 2, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        scale_factor=scale_factor, image_token_id=processor.image_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    attach_processor(tokenizer, processor)
    return model, processor


def write_tiny_vision_model(target: Path, tokenizer: Any, seed: int = 0) -> None:
    """Save the tiny model and its processor (tokenizer, image processor, template) to ``target``."""
    model, processor = build_tiny_vision_model(tokenizer, seed)
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)


def load_vision_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` of a local vision-language model directory, its processor attached to
    the tokenizer (:func:`processor_for`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_type = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: a {model_type} vision-language model; the HF engine feeds images to "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models (Qwen2-VL's 3-D rotary positions are not "
                         "computed yet), see docs/vision.md")
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    if not tokenizer.chat_template:
        tokenizer.chat_template = processor.chat_template or VISION_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    attach_processor(tokenizer, processor)
    return model, tokenizer


def unsampled_token_ids(model: Any) -> list[int]:
    """Token ids a policy never samples: a vision-language model's image placeholder. One sampled
    would stand in the next request without an image behind it ("image features and image tokens
    do not match"), so the engine and the trainer both score it out (:func:`mask_unsampled`)."""
    config = getattr(model, "config", None)
    token = getattr(config, "image_token_id", None) if hasattr(config, "vision_config") else None
    return [int(token)] if token is not None else []


def mask_unsampled(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """``logits`` (fp32) with ``token_ids`` at -1e9: probability 0 at any temperature, and finite, so
    entropies stay finite. The engine samples from this and the trainer scores with it."""
    logits = logits.float()
    if not token_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(token_ids, device=logits.device), -1e9)


# -- images in the token stream ----------------------------------------------------------------------


def placeholder(processor: Any) -> str:
    """The text a chat template writes for one image, which the processor expands into its block."""
    return processor.image_token


def process_image(processor: Any, image: Any) -> tuple[list[int], dict[str, torch.Tensor]]:
    """One image's block of token ids, as the processor expands its placeholder, and its tensors
    (the batch dimension removed: ``pixel_values`` is ``(tiles, 3, H, W)`` for Idefics3)."""
    output = processor(text=[placeholder(processor)], images=[[image]], add_special_tokens=False, return_tensors="pt")
    ids = [int(i) for i in output["input_ids"][0]]
    tensors = {key: value[0] for key, value in output.items()
               if key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor)}
    return ids, tensors


def as_rgb(image: Any) -> Any:
    """The image as the model sees it: RGB, fully loaded (so what is stored is what was processed)."""
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of one image's processed tensors (keys, shapes, dtypes and values)."""
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        hasher.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        hasher.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return hasher.hexdigest()


@dataclass
class ImageInputs:
    """The images of one request, in the order of their blocks in the token ids, and each one's
    processed tensors (what the HF engine feeds the model; a vLLM engine sends ``images``)."""

    images: list[Any] = field(default_factory=list)
    tensors: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tensors)


def model_inputs(tensors: list[dict[str, torch.Tensor]], device: Any = None,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The forward pass's image arguments for images in token order (across the rows of a batch:
    row 0's images, then row 1's, ...), which is the order the model fills image tokens in.

    Tile stacks (Idefics3: ``pixel_values`` ``(tiles, 3, H, W)`` and ``pixel_attention_mask``
    ``(tiles, H, W)``) are zero-padded to a common tile size and joined as one ``(1, tiles, ...)``
    batch entry: the model flattens batch and image dimensions and drops all-zero padding tiles.
    Flat patch lists (Qwen2-VL's ``pixel_values`` and ``image_grid_thw``) are concatenated.
    """
    if not tensors:
        return {}
    joined: dict[str, torch.Tensor] = {}
    for key in tensors[0]:
        parts = [t[key] for t in tensors]
        tiled = key in ("pixel_values", "pixel_attention_mask") and parts[0].dim() >= 3
        if tiled:
            height = max(p.shape[-2] for p in parts)
            width = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2])) for p in parts]
        value = torch.cat(parts)
        value = value.unsqueeze(0) if tiled else value
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        joined[key] = value.to(device) if device is not None else value
    return joined


# -- stored with the trajectory -------------------------------------------------------------------


def record_images(trajectory: Trajectory, images: list[Any], tensors: list[dict[str, torch.Tensor]],
                  turn: int) -> None:
    """Keep images the model now sees with the trajectory: records (inline PNG and the digest of
    the processed tensors) for JSONL, the tensors themselves cached on the object."""
    from agentrl.client import encode_image  # base64 PNG, as images cross the tool server's API

    for image, processed in zip(images, tensors, strict=True):
        trajectory.images.append(ImageRecord(turn, image.width, image.height, data=encode_image(image),
                                             inputs_sha256=digest(processed)))
    cache = _cache(trajectory)
    cache["images"] += list(images)
    cache["tensors"] += list(tensors)


def _cache(trajectory: Trajectory) -> dict[str, list]:
    cache = trajectory.__dict__.get("_image_inputs")
    if cache is None or len(cache["tensors"]) > len(trajectory.images):
        cache = trajectory.__dict__["_image_inputs"] = {"images": [], "tensors": []}
    return cache


def open_record(record: ImageRecord, base_dir: str | Path | None = None) -> Any:
    """The PIL image of a record: its inline PNG, or its file (relative to ``base_dir``)."""
    from agentrl.tools.image import load_image

    if record.data is not None:
        return as_rgb(load_image(base64.b64decode(record.data, validate=True)))
    if record.path is None:
        raise ValueError("an image record holds neither data nor a path")
    path = Path(record.path)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return as_rgb(load_image(path))


def trajectory_image_inputs(trajectory: Trajectory, processor: Any = None,
                            base_dir: str | Path | None = None) -> ImageInputs:
    """The images the model saw in this trajectory and their processed tensors.

    Cached tensors are returned as they are (the very ones the engine was given). Otherwise (a
    trajectory read back from JSONL) each stored image is processed again with ``processor`` (by
    default the one attached last) and must give the digest recorded at rollout time, or this
    raises: the trainer must never score a different input than the one sampled from.
    """
    cache = _cache(trajectory)
    if len(cache["tensors"]) == len(trajectory.images):
        return ImageInputs(list(cache["images"]), list(cache["tensors"]))
    processor = processor if processor is not None else (_LAST[0] if _LAST else None)
    if processor is None:
        raise ValueError(f"trajectory {trajectory.id} holds {len(trajectory.images)} images but no processor is "
                         "loaded to restore their inputs; load the vision-language model first")
    images, tensors = [], []
    for index, record in enumerate(trajectory.images):
        image = open_record(record, base_dir)
        _, processed = process_image(processor, image)
        if record.inputs_sha256 is not None and digest(processed) != record.inputs_sha256:
            raise ValueError(f"trajectory {trajectory.id}: image {index} no longer processes to the inputs the "
                             "engine saw (another processor or processor version?)")
        images.append(image)
        tensors.append(processed)
    cache["images"], cache["tensors"] = images, tensors
    return ImageInputs(list(images), list(tensors))


def store_images_by_reference(trajectories: list[Trajectory], directory: str | Path,
                              base_dir: str | Path | None = None) -> int:
    """Move the trajectories' inline images to PNG files in ``directory`` (named by their content)
    and keep only the path in each record, relative to ``base_dir`` (default ``directory``): JSONL
    files stay small, and the same image seen by many trajectories is written once. Returns how
    many records now point at a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = Path(base_dir) if base_dir is not None else directory
    moved = 0
    for trajectory in trajectories:
        for record in trajectory.images:
            if record.data is None:
                continue
            raw = base64.b64decode(record.data)
            path = directory / f"{hashlib.sha256(raw).hexdigest()[:24]}.png"
            if not path.exists():
                path.write_bytes(raw)
            record.path = str(path.resolve().relative_to(base.resolve())) if path.resolve().is_relative_to(
                base.resolve()) else str(path.resolve())
            record.data = None
            moved += 1
    return moved
