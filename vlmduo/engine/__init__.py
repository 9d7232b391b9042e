"""The engine: llama.cpp through llama-cpp-python's C bindings and libmtmd.

Weights (``weights``, ``model``), contexts and sessions with their KV cache
(``session``), sampler chains (``sampling``), GGUF checks before llama.cpp sees a
file (``gguf_check``, ``gguf_meta``), chat templates (``chat``), llama.cpp's logs
(``logs``), the backend and its threads (``backend``, ``settings``), the bindings
loader (``bindings``). Uses nothing of vlmduo but ``errors``, ``timing`` and ``paths``.
"""
