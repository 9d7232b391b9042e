"""Whether downloads are off, read from the environment as huggingface_hub reads it.

Kept apart from :mod:`vlmduo.models.hub` so that an ask on model files given as paths never
imports huggingface_hub (about 90 ms) just to learn that it will not download.
"""

from __future__ import annotations

import os
import sys

# huggingface_hub.constants.ENV_VARS_TRUE_VALUES
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def offline_by_environment() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in TRUE_VALUES


def offline_mode(offline: bool = False) -> bool:
    """True when downloads are off: ``offline`` asked for, or ``HF_HUB_OFFLINE=1``.

    huggingface_hub reads the same variables once, when it is imported; if it was,
    its reading counts too (it refuses the network by it).
    """
    constants = sys.modules.get("huggingface_hub.constants")
    return offline or offline_by_environment() or bool(getattr(constants, "HF_HUB_OFFLINE", False))
