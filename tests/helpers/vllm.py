"""The vLLM environment the real-vLLM tests need: its interpreter, or a module-level skip (an error
under CI, whose setup installs it)."""

import os

import pytest


def require_vllm() -> str:
    """The vLLM environment's Python (scripts/setup.sh makes it); skips the calling test module
    when it is missing, and fails it under CI."""
    try:
        from agentrl.engines.vllm import vllm_python

        python = vllm_python()
        reason = "vllm_python() found none"
    except Exception as error:  # the reason is the skip message
        python, reason = None, str(error)
    if python is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI installs vLLM (scripts/setup.sh) but it is missing: {reason}")
        pytest.skip(f"no vLLM environment: {reason}", allow_module_level=True)
    return python
