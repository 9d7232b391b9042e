"""Whether downloads are off, read from the environment as huggingface_hub reads it.

Kept apart from :mod:`vlmduo.hub` so that an ask on model files given as paths never
imports huggingface_hub (about 90 ms) just to learn that it will not download.
"""

from __future__ import annotations

import os

# huggingface_hub.constants.ENV_VARS_TRUE_VALUES
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def offline_by_environment() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in TRUE_VALUES
