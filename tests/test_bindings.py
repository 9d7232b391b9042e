"""llama-cpp-python's C bindings without its high-level API, in a process vlmduo owns."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import importlib.metadata, sys
from vlmduo.engine import bindings
bindings.import_bindings_only()
import llama_cpp
print("loaded", [m for m in sys.modules if m.startswith("llama_cpp.")])
import llama_cpp.mtmd_cpp
heavy = ("numpy", "jinja2", "llama_cpp.llama", "llama_cpp.llama_chat_format")
print("before", [m for m in heavy if m in sys.modules])
assert callable(llama_cpp.llama_decode) and callable(llama_cpp.mtmd_cpp.mtmd_init_from_file)
print("still", [m for m in heavy if m in sys.modules])
{use}
print("after", [m for m in heavy if m in sys.modules])
"""


def _probe(use: str) -> list[str]:
    code = PROBE.format(use=use)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_the_bindings_come_without_the_high_level_api():
    # Registering the package loads nothing: ``vlmduo --help`` needs no llama.cpp.
    assert _probe("pass") == ["loaded []", "before []", "still []", "after []"]


@pytest.mark.parametrize(
    "use",
    [
        "from llama_cpp import Llama; assert Llama.__name__ == 'Llama'",
        "assert llama_cpp.__version__ == importlib.metadata.version('llama-cpp-python')",
        "import llama_cpp.llama_grammar; assert llama_cpp.LlamaGrammar and 'Llama' in dir(llama_cpp)",
        # A submodule imported directly reads the package mid-import (circularly).
        "from llama_cpp.llama import Llama; assert llama_cpp.Llama is Llama",
        "import llama_cpp.llama_chat_format; assert llama_cpp.Llama.__name__ == 'Llama'",
    ],
)
def test_the_rest_of_the_package_loads_on_first_use(use):
    lines = _probe(use)
    assert lines[:2] == ["loaded []", "before []"]
    assert "llama_cpp.llama" in lines[-1] and "numpy" in lines[-1]


def test_a_thread_reading_the_api_while_another_loads_it_waits():
    code = (
        "import threading, time\n"
        "from vlmduo.engine import bindings\n"
        "bindings.import_bindings_only()\n"
        "import llama_cpp\n"
        "llama_cpp.llama_decode\n"
        "got = []\n"
        "def read(delay):\n"
        "    time.sleep(delay)\n"
        "    try:\n"
        "        got.append(llama_cpp.Llama.__name__)\n"
        "    except AttributeError as exc:\n"
        "        got.append(repr(exc))\n"
        "threads = [threading.Thread(target=read, args=(d,)) for d in (0.0, 0.02)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(got)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['Llama', 'Llama']"


def test_an_imported_package_is_left_as_it_is():
    code = (
        "import sys, llama_cpp\n"
        "from vlmduo.engine import bindings\n"
        "real = sys.modules['llama_cpp']\n"
        "bindings.import_bindings_only()\n"
        "assert sys.modules['llama_cpp'] is real and 'Llama' in vars(real)\n"
        "assert '__getattr__' not in vars(real)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
