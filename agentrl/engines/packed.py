"""Decoding on the CPU in float32 with oneDNN and packed weights.

On the CPU torch computes a float32 ``F.linear`` with MKL's sgemm over the weight as stored. oneDNN
over the same weight reordered once into its blocked layout does it in less time for the small
row counts of decoding, the vocabulary projection most of all (``bench/engine.py`` records the
engine's throughput with and without). :class:`PackedLinears` is a ``TorchFunctionMode`` that the
HF engine's forward passes run under: each float32 linear on the CPU goes to
``torch.ops.mkldnn._linear_pointwise`` with its packed weight. A weight is packed when first seen
and again whenever it has changed: its version counter moves with every in-place write (an optimizer
step, ``load_state_dict``), and a new tensor has a new identity, so the engine can never decode
with stale weights. The trainer's own forward and backward passes never run under the mode.

The packed copies take as much memory as the linear weights they pack; before each update the
trainer frees those of the weights it trains (:meth:`HFEngine.release_memory`), so they never sit
beside the update's activations. ``rollout.packed_weights=false`` turns the packing off. Results
agree with MKL's to float32 rounding (a different summation order), not bit for bit.
"""

from __future__ import annotations

import platform
import weakref

import torch
from torch.overrides import TorchFunctionMode

_LINEAR, _FLOAT32 = torch.nn.functional.linear, torch.float32
_PACKED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def available() -> bool:
    """oneDNN's packed linear exists in this torch build and runs here (x86-64)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and _PACKED_LINEAR is not None and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinears(TorchFunctionMode):
    """Route float32 CPU linears to oneDNN with weights packed once per weight version."""

    def __init__(self):
        super().__init__()
        self._packed: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}
        self.packings = 0  # weights packed so far (first sight or a changed weight)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # every torch call of the forward pass comes through here: the test for linear comes first
        if func is _LINEAR:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
            if (weight.dtype == _FLOAT32 and x.dtype == _FLOAT32 and weight.device.type == "cpu"
                    and weight.dim() == 2 and not weight.is_mkldnn):
                return _PACKED_LINEAR(x, self._weight(weight), bias, "none", [], "")
        return func(*args, **(kwargs or {}))

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        state = (weight._version, weight.data_ptr())
        entry = self._packed.get(id(weight))
        if entry is None or entry[0]() is not weight or entry[1] != state:
            if entry is None:  # a weight not seen before: forget those that no longer exist
                self._packed = {key: e for key, e in self._packed.items() if e[0]() is not None}
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            entry = (weakref.ref(weight), state, packed)
            self._packed[id(weight)] = entry
            self.packings += 1
        return entry[2]

    def release_trainable(self) -> None:
        """Free the packed copies of weights that require grad: an update is about to change them
        (they would be packed again anyway). Frozen weights, a LoRA run's base, keep theirs."""
        self._packed = {key: entry for key, entry in self._packed.items()
                        if (weight := entry[0]()) is not None and not weight.requires_grad}
