"""agentrl: reinforcement learning for multi-turn, tool-using LLM agents."""

__version__ = "0.1.0"

from agentrl.tool import InfraError, Observation, Tool, ToolContext, ToolError, tool  # noqa: E402

__all__ = ["InfraError", "Observation", "Tool", "ToolContext", "ToolError", "__version__", "tool"]
