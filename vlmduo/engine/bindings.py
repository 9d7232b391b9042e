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
    package.__getattr__ = _DeferredInit(package)  # type: ignore[attr-defined]
    sys.modules[PACKAGE] = package


class _DeferredInit:
    """The package's PEP 562 ``__getattr__`` while its ``__init__`` waits: the first
    name read binds what ``from .llama_cpp import *`` (the ``__init__``'s first line)
    binds; a name the bindings do not define runs the whole ``__init__`` once, while
    other threads wait for it."""

    def __init__(self, package: ModuleType) -> None:
        self.package = package
        self.bindings_bound = False
        self.complete = False
        self.runner: int | None = None  # the thread running the package's __init__

    def __call__(self, name: str) -> object:
        # A submodule imported directly (``from llama_cpp.llama import Llama``) is
        # read from the package before it is bound there (``llama_chat_format`` does
        # ``import llama_cpp.llama``): answer from sys.modules, as the import system
        # would, and never run the __init__ for it from inside that import.
        submodule = sys.modules.get(f"{PACKAGE}.{name}")
        if submodule is not None:
            return submodule
        namespace = self.package.__dict__
        with _loading:
            if self.runner == threading.get_ident():
                # The __init__ itself reading a name it has not bound yet.
                raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
            if not self.bindings_bound:
                bindings = importlib.import_module(f"{PACKAGE}.llama_cpp")
                # What ``from .llama_cpp import *`` binds (the module has no ``__all__``).
                namespace.update({k: v for k, v in vars(bindings).items() if not k.startswith("_")})
                self.bindings_bound = True
            if name not in namespace and not self.complete:
                self._run_init()
        try:
            return namespace[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    def _run_init(self) -> None:
        """The package's own ``__init__``, once; a failure is raised again next time."""
        self.runner = threading.get_ident()
        try:
            self.package.__spec__.loader.exec_module(self.package)  # type: ignore[union-attr]
            self.complete = True
            self.package.__dict__.pop("__getattr__", None)
        finally:
            self.runner = None
