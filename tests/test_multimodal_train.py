"""`agentrl train configs/visual.yaml` runs two RL steps of the tiny vision-language model on the
CPU: the policy sees the task's image, and the update scores exactly the inputs it sampled from."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_step_visual_run_completes_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "agentrl.cli", "train", "configs/visual.yaml", f"output_dir={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0 and "update/trajectories" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert row["update/trajectories"] == 4 and row["failures"] == 0
        assert row["rollout/logprob_mismatch"] < 1e-4  # the trainer's forward sees what the engine saw
    sample = json.loads((out / "samples" / "step-000002.jsonl").read_text().splitlines()[0])
    (image,) = sample["images"]
    assert (image["turn"], image["width"], image["height"]) == (-1, 1024, 1024) and image["data"] and image["inputs_sha256"]
    assert sample["prompt_text"].count("<image>") > 0 and "<global-img>" in sample["prompt_text"]
    assert (out / "model" / "model.safetensors").is_file()
    from agentrl.models import load_model
    from agentrl.multimodal import processor_for

    _, tokenizer = load_model(str(out / "model"))  # the final model reloads as a vision-language model
    assert processor_for(tokenizer) is not None
