"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``<output_dir>/checkpoints/step-000042/`` holding

- ``model/``: the weights with ``save_pretrained`` (only the adapters for a LoRA run), loadable by
  transformers or peft on their own;
- ``training.pt``: optimizer, scheduler and value-head states, the RNG states (python, numpy,
  torch) and the opaque ``state_dict()`` of the partial-rollout manager and of further trainer
  parts (``extra``); it holds only tensors and plain data (numbers, strings, bytes, lists, tuples,
  sets, dicts) and is loaded with ``torch.load(weights_only=True)``, so a checkpoint file that holds
  any other object (a pickle that would run code when loaded) is refused;
- ``state.json``: step, data position, policy version and every metric logged so far.

It is written into a hidden temporary directory, every file fsynced, then renamed into place, and
only then does the ``latest`` pointer (itself replaced atomically) name it. A process killed at any
moment leaves either the previous checkpoint as ``latest`` or the new one complete; a half-written
temporary directory is ignored and removed by the next save.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds an object other than tensors and plain data; it is not loaded."""


@dataclass
class TrainerState:
    """Everything about the run's progress that is not a tensor."""

    step: int = 0
    data_position: int = 0  # prompts consumed from the (seeded, shuffled) training stream
    policy_version: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    for directory in [*sorted(p for p in path.rglob("*") if p.is_dir()), path]:
        _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_pointer(root: Path, name: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".latest-", dir=root)
    with os.fdopen(handle, "w") as pointer:
        pointer.write(name + "\n")
        pointer.flush()
        os.fsync(pointer.fileno())
    os.replace(temporary, root / LATEST)
    _fsync_dir(root)


def save_final_model(model, tokenizer, output_dir: str | Path, name: str = "model") -> Path:
    """Write the final weights and tokenizer to ``output_dir/name`` atomically.

    They go to a staging directory, are fsynced, and only then replace the previous final model
    (renamed aside first, removed last), so a process killed at any point leaves a complete model:
    the old one or the new one (or, only between the two renames, the old one under ``.name-old-*``,
    which the next save puts back)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    for stale in root.glob(f".{name}-new-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(f".{name}-old-*"):
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between the two renames: the old model is the complete one
            os.replace(old, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-new-", dir=root))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    from agentrl.multimodal import processor_for

    if (processor := processor_for(tokenizer)) is not None:  # a vision-language model reloads with its processor
        processor.save_pretrained(staging)
    _fsync_tree(staging)
    aside = root / f".{name}-old-{os.getpid()}"
    if target.exists():
        os.replace(target, aside)
    os.replace(staging, target)
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)
    return target


_PLAIN = (str, bytes, bool, int, float, complex, type(None), torch.Size, torch.dtype, torch.device)


def plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with only what ``torch.load(weights_only=True)`` accepts: tensors, numbers,
    strings, bytes, ``None`` and lists, tuples, sets and dicts of them. A numpy scalar becomes its
    Python number; anything else (an object, a numpy array) raises ``TypeError`` naming where it
    is, when the checkpoint is written rather than when it is loaded."""
    if isinstance(value, np.generic):  # before the numbers: np.float64 is a float, yet pickles as numpy's
        return value.item()
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):  # not subclasses (an enum pickles as a global)
        return value
    if type(value) in (dict, collections.OrderedDict):
        return type(value)((plain(key, where), plain(item, f"{where}[{key!r}]")) for key, item in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(plain(item, f"{where}[{index}]") for index, item in enumerate(value))
    return _refuse(value, where)


def _refuse(value: Any, where: str) -> Any:
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint holds only "
                    "tensors and plain data (numbers, strings, lists, tuples, sets, dicts), which load without "
                    "unpickling objects: convert it in the state_dict()")


def rng_states() -> dict[str, Any]:
    """The RNG states as plain data: numpy's MT19937 key as a list of ints, not an array."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.random.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_checkpoint(
    output_dir: str | Path,
    state: TrainerState,
    model,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    value_head: torch.nn.Module | None = None,
    partial_rollouts: dict[str, Any] | None = None,
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``state.step`` atomically, point ``latest`` at it, keep ``keep``."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = step_name(state.step)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    model.save_pretrained(staging / "model", safe_serialization=True)
    training = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "value_head": value_head.state_dict() if value_head is not None else None,
        "rng": rng_states(),
        "partial_rollouts": partial_rollouts,
        "extra": extra,  # further trainer state (the ArCHer critic, a recipe's replay buffer)
    }
    torch.save(plain(training, "training"), staging / "training.pt")
    (staging / "state.json").write_text(json.dumps(state.__dict__, allow_nan=True))
    _fsync_tree(staging)
    target = root / name
    if target.exists():  # the same step saved again (a resumed run re-saving): replace it
        shutil.rmtree(target)
    os.replace(staging, target)
    _fsync_dir(root)
    _write_pointer(root, name)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file() and (p / "training.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or (if the pointer is missing) the newest complete one."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_weights(model, directory: str | Path) -> None:
    """Load weights written by ``save_pretrained`` into ``model`` in place (adapters for peft)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    if not state:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()


def load_training_state(path: str | Path) -> dict[str, Any]:
    """``training.pt`` loaded with ``weights_only=True``: tensors and plain data only, never an
    arbitrary object (whose unpickling could run code). Anything else raises :class:`UnsafeCheckpoint`.
    Every tensor is loaded onto the CPU, so a checkpoint written on a GPU loads on a machine without
    one; the optimizer's and modules' ``load_state_dict`` then copy them to their parameters' device."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        reason = next((line.split("error:", 1)[1].split(". ")[0].strip() for line in str(error).splitlines()
                       if "WeightsUnpickler error:" in line), "an object torch.load(weights_only=True) refuses")
        raise UnsafeCheckpoint(f"refusing to load {path}: it holds more than tensors and plain data, and "
                               f"unpickling it could run code ({reason})") from None


def load_checkpoint(
    path: str | Path,
    model,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    value_head: torch.nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[TrainerState, dict[str, Any] | None]:
    """Restore everything a checkpoint holds; returns the trainer state and the partial-rollout state.
    ``extra``, if given, is filled with the further state ``save_checkpoint`` was given."""
    path = Path(path)
    training = load_training_state(path / "training.pt")
    load_weights(model, path / "model")
    if optimizer is not None and training["optimizer"] is not None:
        optimizer.load_state_dict(training["optimizer"])
    if scheduler is not None and training["scheduler"] is not None:
        scheduler.load_state_dict(training["scheduler"])
    if value_head is not None and training["value_head"] is not None:
        value_head.load_state_dict(training["value_head"])
    set_rng_states(training["rng"])
    if extra is not None:
        extra.update(training.get("extra") or {})
    state = TrainerState(**json.loads((path / "state.json").read_text()))
    return state, training["partial_rollouts"]
