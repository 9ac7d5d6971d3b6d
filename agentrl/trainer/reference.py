"""The KL reference: a frozen copy of the policy RL starts from, i.e. after any SFT warm start
(InstructGPT, DeepSeek-R1 and verl all anchor the KL there), persisted once so a resume rebuilds it."""

from __future__ import annotations

import copy
from pathlib import Path

REFERENCE_DIR = "reference"


def needs_post_sft_reference(config) -> bool:
    """The KL anchors to the policy RL starts from: after an SFT warm start that is the SFT model."""
    return config.algo.kl_coef > 0 and config.sft.enabled


def snapshot_reference(run):
    """A frozen copy of the policy as it is now (after the warm start), also written to
    ``output_dir/reference/`` once, so a resume does not depend on the step-0 checkpoint surviving
    ``keep_checkpoints``. For LoRA the copy keeps the SFT-trained adapters (frozen)."""
    reference = copy.deepcopy(run.model).eval().requires_grad_(False)
    run.model.save_pretrained(Path(run.config.output_dir) / REFERENCE_DIR, safe_serialization=True)
    return reference


def load_reference(run):
    """The post-SFT reference of a resumed run, rebuilt from ``output_dir/reference/``."""
    from agentrl.trainer.checkpoint import load_weights

    directory = Path(run.config.output_dir) / REFERENCE_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing: this run's KL reference (the policy after the SFT warm "
                                "start) cannot be rebuilt; start the run again in a new output_dir")
    reference = copy.deepcopy(run.model).eval().requires_grad_(False)
    load_weights(reference, directory)
    return reference
