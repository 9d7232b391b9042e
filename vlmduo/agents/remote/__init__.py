"""Agents served by OpenAI-compatible engines: vLLM, SGLang, llama-server, Ollama.

``--small``/``--large`` take ``URL#MODEL``, or a registry entry with ``endpoint``
and ``model``; ``vlmduo.api.load_agent`` turns either into a ``RemoteAgent``.
httpx is imported with this package, never by the local paths.
"""

from vlmduo.agents.remote.agent import RemoteAgent, RemoteModel, from_entry, is_remote_ref, parse_ref

__all__ = ["RemoteAgent", "RemoteModel", "from_entry", "is_remote_ref", "parse_ref"]
