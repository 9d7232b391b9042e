"""Models: the registry (``models.toml``), Hub downloads, synthetic and family fixtures.

``registry`` merges the shipped and the user's ``models.toml``; ``hub`` downloads
into the Hugging Face cache; ``synthetic`` builds random-weight entries from
``fixtures`` (one builder per family, shaped like llama.cpp's converter output);
``readiness`` says whether a pair can answer and what to run next. Uses nothing of
vlmduo but ``errors`` and ``paths``: no engine.
"""
