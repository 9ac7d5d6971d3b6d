"""The sandbox interface: ``run(code, stdin, files, timeout, memory_mb) -> RunResult``.

Backends: ``bwrap`` (default: bubblewrap namespaces, a warm pool of pre-forked workers),
``docker`` (the docker SDK, when an engine is reachable) and ``process`` (a plain subprocess with
rlimits, for trusted code only, never chosen implicitly). A backend that cannot run raises
:class:`SandboxUnavailable`; nothing ever falls back to a weaker backend on its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024


class SandboxUnavailable(RuntimeError):
    """The configured backend cannot run here; the message says what to install or change."""


@dataclass
class RunResult:
    stdout: str = ""
    stderr: str = ""
    return_code: int | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    duration_s: float = 0.0
    sandbox_error: str | None = None  # the sandbox itself failed (not the code)
    files: dict[str, str] = field(default_factory=dict)  # fetched work-directory files, base64
    files_missing: dict[str, str] = field(default_factory=dict)  # requested files not returned, and why

    @property
    def ok(self) -> bool:
        return self.return_code == 0 and not self.timed_out and self.sandbox_error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_model(self, max_error_lines: int = 8) -> str:
        """What the model sees: stdout, then a short error (the last traceback lines), never noise."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.timed_out:
            parts.append("Error: the code ran past its time limit and was stopped.")
        elif self.memory_exceeded:
            parts.append("Error: the code ran out of memory (MemoryError).")
        elif self.sandbox_error:
            parts.append(f"Error: the sandbox failed: {self.sandbox_error}")
        elif self.return_code != 0 and self.stderr.strip():
            parts.append("\n".join(self.stderr.rstrip("\n").splitlines()[-max_error_lines:]))
        elif self.return_code != 0:
            parts.append(f"Error: the process exited with code {self.return_code}.")
        return "\n".join(parts) if parts else "(no output)"


class Backend(ABC):
    """Runs untrusted Python. Implementations are thread-safe; ``run`` blocks."""

    name: str = ""

    @abstractmethod
    def run(self, code: str, stdin: str = "", files: dict[str, bytes] | None = None, timeout: float = 10.0,
            memory_mb: int = 512, language: str = "python", fetch_files: list[str] | tuple[str, ...] = ()) -> RunResult:
        """Run ``code`` in a fresh, isolated interpreter and return what happened, with the
        work-directory files named in ``fetch_files``. An unsupported ``language`` raises
        :class:`SandboxUnavailable` naming the supported ones."""

    def languages(self) -> list[str]:
        return ["python"]

    def session(self, memory_mb: int = 512) -> Session:
        raise SandboxUnavailable(f"the {self.name} backend has no stateful sessions")

    def close(self) -> None:
        """Stop pre-started workers."""


class Session(ABC):
    """A persistent interpreter for one trajectory: variables survive between calls."""

    @abstractmethod
    def run(self, code: str, timeout: float = 10.0) -> RunResult: ...

    @abstractmethod
    def close(self) -> None: ...


def get_backend(name: str, **options: Any) -> Backend:
    """The named backend, checked to work here (raises :class:`SandboxUnavailable` otherwise)."""
    if name == "bwrap":
        from agentrl.sandbox.bwrap import BwrapBackend

        return BwrapBackend(**options)
    if name == "process":
        from agentrl.sandbox.process import ProcessBackend

        return ProcessBackend(**options)
    if name == "docker":
        from agentrl.sandbox.docker import DockerBackend

        return DockerBackend(**options)
    raise SandboxUnavailable(f"unknown sandbox backend {name!r}; choose bwrap, docker or process")
