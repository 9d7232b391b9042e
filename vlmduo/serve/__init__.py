"""``vlmduo serve``: keep a pair of models loaded behind a local HTTP server.

May use the public API (``vlmduo.api``) and the layers below it; never the command
line, which hands the server what it runs for thin clients (``AppConfig.cli_runner``).

- ``runtime``: where running servers are recorded, the per-pair lock, discovery.
- ``host``: the loaded pair, its one-at-a-time queue, idle unload and reload.
- ``openai_api``: the OpenAI chat-completions schema mapped onto vlmduo's options.
- ``inputs``: validating request bodies and decoding their images under caps.
- ``app``: the Starlette application (OpenAI-compatible and native endpoints).
- ``server``: start-up (lock, socket, load, uvicorn) and ``--detach``.
- ``client``: what ``vlmduo ask`` uses to ask a running server (httpx), when the thin
  client (``vlmduo.cli.thin_client``, standard library only) did not.

Only ``client``, ``runtime`` and ``wire`` are imported by ``vlmduo ask``; they import
neither the engine nor the web stack.
"""
