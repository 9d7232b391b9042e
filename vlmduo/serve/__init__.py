"""``vlmduo serve``: keep a pair of models loaded behind a local HTTP server.

- ``runtime``: where running servers are recorded, the per-pair lock, discovery.
- ``host``: the loaded pair, its one-at-a-time queue, idle unload and reload.
- ``openai_api``: the OpenAI chat-completions schema mapped onto vlmduo's options.
- ``app``: the Starlette application (OpenAI-compatible and native endpoints).
- ``server``: start-up (lock, socket, load, uvicorn) and ``--detach``.
- ``client``: what ``vlmduo ask`` uses to ask a running server (httpx), when the thin
  client (``vlmduo.cli.thin_client``, standard library only) did not.
- ``cli_call``: ``vlmduo ask`` run inside the server for a thin client.

Only ``client``, ``runtime`` and ``cli_call`` are imported by ``vlmduo ask``; they
import neither the engine nor the web stack.
"""
