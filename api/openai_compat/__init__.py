"""The OpenAI-compatible API under `/openai/v1` (`routes` assembles it; see its docstring)."""
