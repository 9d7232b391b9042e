"""llama-cpp-python's C bindings without its high-level API, for processes vlmduo owns.

vlmduo calls llama.cpp through the ctypes bindings only (``llama_cpp.llama_cpp`` and
``llama_cpp.mtmd_cpp``). The package's ``__init__`` also imports its high-level
``Llama`` class, and with it numpy, jinja2, diskcache and its chat formats: about
110 ms of every ``vlmduo ask`` process, on a job llama.cpp's own tools start in 10 ms.

:func:`import_bindings_only` defers that ``__init__``: the first name read from the
package binds what its first line (``from .llama_cpp import *``) binds, and the rest
runs the first time anybody reads a name the bindings do not define
(``llama_cpp.Llama``, ``llama_cpp.__version__``), so other code in the process sees
the whole package as usual. Only the command line calls it: a library must not
change how its host's packages initialise.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

PACKAGE = "llama_cpp"
_loading = threading.RLock()


def import_bindings_only() -> None:
    """Register ``llama_cpp`` so that it loads its C bindings when first used and its
    high-level API only when asked for; a no-op once the package is imported (either
    way) or when it cannot be found (the usual import then reports it in its words).

    Nothing is loaded here: ``vlmduo --help`` never needs llama.cpp's libraries.
    """
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    package.__getattr__ = _on_first_use(package)  # type: ignore[attr-defined]
    sys.modules[PACKAGE] = package


def _on_first_use(package: ModuleType):  # noqa: ANN202 - a module __getattr__
    """A PEP 562 ``__getattr__`` for the package: the first name read binds what
    ``from .llama_cpp import *`` (the first line of its ``__init__``) binds; a name the
    bindings do not define runs the whole ``__init__`` once."""
    state = {"bindings": False}

    def __getattr__(name: str) -> object:
        with _loading:
            if not state["bindings"]:
                bindings = importlib.import_module(f"{PACKAGE}.llama_cpp")
                # What ``from .llama_cpp import *`` binds (the module has no ``__all__``).
                public = {k: v for k, v in vars(bindings).items() if not k.startswith("_")}
                package.__dict__.update(public)
                state["bindings"] = True
            if name not in package.__dict__ and package.__dict__.pop("__getattr__", None) is not None:
                try:
                    package.__spec__.loader.exec_module(package)  # type: ignore[union-attr]
                except BaseException:
                    package.__getattr__ = __getattr__  # type: ignore[attr-defined]  # fail again next time
                    raise
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    return __getattr__
