"""Agents: a model in a role (reason, answer short, take a transfer) behind one interface.

``base`` holds the interface (``AgentLike``) and what travels through it; ``local``
runs a model through the engine, ``remote`` one served by vLLM, SGLang, llama-server
or Ollama, ``scripted`` a queued script for tests; ``prompts`` holds the words every
agent puts around a question. Uses the engine, models, media and answers layers.
"""
