"""The verl tests run in the verl environment.

verl 0.9.1 pins transformers<5.11, so it lives in its own environment (``.venv-verl``, made by
scripts/setup.sh). The tests that import verl (:data:`VERL_TESTS`) are skipped in the main
environment; this test runs them there, in one pytest process, and fails if any of them fails or
is skipped. ``AGENTRL_SKIP_VERL=1`` (setup without the verl environment) skips it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERL_PYTHON = Path(os.environ.get("AGENTRL_VERL_PYTHON", ROOT / ".venv-verl" / "bin" / "python"))
VERL_TESTS = ["tests/test_verl_plugin.py", "tests/test_verl_algorithms.py", "tests/test_verl_data.py",
              "tests/test_verl_agent_loop.py", "tests/test_verl_multimodal.py", "tests/test_verl_ray.py"]


def verl_python() -> Path:
    if not VERL_PYTHON.is_file():
        if os.environ.get("AGENTRL_SKIP_VERL") == "1":
            pytest.skip("AGENTRL_SKIP_VERL=1: no verl environment")
        pytest.fail(f"no verl environment at {VERL_PYTHON}; run scripts/setup.sh")
    return VERL_PYTHON


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_verl_tests_pass_in_the_verl_environment():
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([str(verl_python()), "-m", "pytest", *VERL_TESTS, "-q", "-rs", "-p", "no:cacheprovider",
                             "-o", "timeout=600"], cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=880)
    output = result.stdout + result.stderr
    tail = "\n".join(output.splitlines()[-60:])
    assert result.returncode == 0, tail
    summary = [line for line in output.splitlines() if re.search(r"\d+ passed", line)]
    assert summary and "skipped" not in summary[-1], tail
