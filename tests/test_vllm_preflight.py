"""rollout.engine=vllm without a working vLLM environment is refused before anything loads, as one
line that names the setting and the fix (`bash scripts/setup.sh`). No vLLM server starts here."""

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from agentrl.config import ConfigError, load_config
from agentrl.engines.vllm import VLLM_VENV, VLLMServer, worker_threads
from agentrl.preflight import check_run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def quickstart(*overrides: str):
    return load_config(QUICKSTART, list(overrides))


def refusal(monkeypatch, python: Path | str) -> str:
    monkeypatch.setenv("AGENTRL_VLLM_PYTHON", str(python))
    with pytest.raises(ConfigError) as caught:
        check_run(quickstart("rollout.engine=vllm"), probe_urls=False)
    message = str(caught.value)
    assert message.startswith("rollout.engine=vllm")
    assert "bash scripts/setup.sh" in message
    assert "\n" not in message
    return message


def test_a_missing_vllm_environment_is_refused_with_the_setting_and_the_fix(monkeypatch, tmp_path):
    missing = tmp_path / "missing" / "bin" / "python"
    assert str(missing) in refusal(monkeypatch, missing)


def test_an_environment_without_vllm_is_refused(monkeypatch, tmp_path):
    venv.create(tmp_path / "empty", with_pip=False)  # a real interpreter with nothing installed
    assert "has no vllm" in refusal(monkeypatch, tmp_path / "empty" / "bin" / "python")


def test_an_interpreter_that_cannot_start_is_refused(monkeypatch, tmp_path):
    dangling = tmp_path / "python"
    dangling.symlink_to(tmp_path / "gone" / "python3")  # a venv whose base interpreter was removed
    assert "does not run" in refusal(monkeypatch, dangling)


def test_the_hf_engine_does_not_look_for_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTRL_VLLM_PYTHON", str(tmp_path / "missing"))
    check_run(quickstart("rollout.engine=hf"), probe_urls=False)


def test_agentrl_train_stops_before_loading_the_model(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, AGENTRL_VLLM_PYTHON=str(tmp_path / "missing" / "bin" / "python"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "agentrl.cli", "train", QUICKSTART, "rollout.engine=vllm",
                             f"output_dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rollout.engine=vllm" in lines[0] and "bash scripts/setup.sh" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # refused before the run started: no model, no output directory
    assert time.monotonic() - started < 120


@pytest.mark.skipif(not (ROOT / VLLM_VENV / "bin" / "python").is_file() and not os.environ.get("CI"),
                    reason=f"no {VLLM_VENV} (scripts/setup.sh makes it)")
def test_the_environment_setup_makes_passes(monkeypatch):
    monkeypatch.delenv("AGENTRL_VLLM_PYTHON", raising=False)
    check_run(quickstart("rollout.engine=vllm"), probe_urls=False)


def test_the_vllm_worker_leaves_a_core_to_the_scheduler_process(tmp_path):
    assert worker_threads(2, cores=2) == 1  # trainer.torch_threads=2 on two cores
    assert worker_threads(8, cores=4) == 3
    assert worker_threads(2, cores=16) == 2
    assert worker_threads(4, cores=1) == 1
    server = VLLMServer(tmp_path, threads=64, python=sys.executable)
    try:
        environment = server.environment()
    finally:
        shutil.rmtree(server.workdir)
    assert environment["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) - 1))
    assert environment["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_a_server_on_the_trainers_gpu_takes_its_share_and_can_sleep(tmp_path):
    """On the trainer's GPU (build_engine: the policy's parameters are on CUDA) the server is started
    with rollout.gpu_memory_utilization and sleep mode; elsewhere with neither (vLLM-CPU refuses
    sleep mode, and a GPU of its own is the server's to fill)."""
    shared = VLLMServer(tmp_path, python=sys.executable, gpu_memory_utilization=0.35)
    alone = VLLMServer(tmp_path, python=sys.executable)
    try:
        command, plain = shared.command(), alone.command()
    finally:
        shutil.rmtree(shared.workdir)
        shutil.rmtree(alone.workdir)
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.35" and "--enable-sleep-mode" in command
    assert "--gpu-memory-utilization" not in plain and "--enable-sleep-mode" not in plain
    assert quickstart("rollout.gpu_memory_utilization=0.35").rollout.gpu_memory_utilization == 0.35
    with pytest.raises(ConfigError):
        quickstart("rollout.gpu_memory_utilization=1.5")
