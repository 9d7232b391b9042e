"""llama-cpp-python's C bindings without its high-level API, for processes vlmduo owns.

vlmduo calls llama.cpp through the ctypes bindings only (``llama_cpp.llama_cpp`` and
``llama_cpp.mtmd_cpp``). The package's ``__init__`` also imports its high-level
``Llama`` class, and with it numpy, jinja2, diskcache and its chat formats: about
110 ms of every ``vlmduo ask`` process, on a job llama.cpp's own tools start in 10 ms.

:func:`import_bindings_only` runs the first line of that ``__init__``
(``from .llama_cpp import *``) and defers the rest to the first time anybody reads a
name the bindings do not define (``llama_cpp.Llama``, ``llama_cpp.__version__``), so
other code in the process sees the whole package as usual. Only the command line
calls it: a library must not change how its host's packages initialise.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

PACKAGE = "llama_cpp"
_completing = threading.Lock()


def import_bindings_only() -> None:
    """Import ``llama_cpp`` as its C bindings, deferring its high-level API; a no-op
    once the package is imported (either way) or when it cannot be found (the usual
    import then reports it in its own words)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    try:
        bindings = importlib.import_module(f"{PACKAGE}.llama_cpp")
    except BaseException:
        # Leave nothing half-made: the usual import runs (and fails) as it would have.
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
        raise
    # What ``from .llama_cpp import *`` binds (the module has no ``__all__``).
    package.__dict__.update({k: v for k, v in vars(bindings).items() if not k.startswith("_")})
    package.__getattr__ = _complete_on_first_use(package)  # type: ignore[attr-defined]


def _complete_on_first_use(package: ModuleType):  # noqa: ANN202 - a module __getattr__
    """A PEP 562 ``__getattr__`` that runs the package's own ``__init__`` once, then
    answers from the completed module."""

    def __getattr__(name: str) -> object:
        with _completing:
            hook = package.__dict__.pop("__getattr__", None)
            if hook is not None:
                assert package.__spec__ is not None and package.__spec__.loader is not None
                try:
                    package.__spec__.loader.exec_module(package)
                except BaseException:
                    package.__getattr__ = hook  # type: ignore[attr-defined]  # fail again next time
                    raise
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    return __getattr__
