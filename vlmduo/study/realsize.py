"""Real-size simulated models: a published checkpoint's exact shape, with random weights.

Latency depends on shapes, quantisation and hardware, not on weight values: a
random-weight model with Qwen3-VL 8B's architecture, quantised like the
published Q4_K_M file, costs what the real one costs, token for token. This
module builds such a model for a registry name whose family builder lists it in
``REAL_SHAPES`` (dimensions transcribed from the published config.json, see the
comment above each ``REAL_SHAPES``), and caches it by a digest of the shape.

The files are written by the family's own fixture builder (same GGUF keys,
tensor names, tokenizer and chat template as the tiny fixtures), with two of
its seams replaced for the duration of the build, so that an 8B model needs
neither 16 GB of RAM nor minutes of random-number generation:

- ``gguf.GGUFWriter`` spools every tensor to a file beside the output as soon as
  it is added (gguf-py's own temp-file mode), so memory holds one tensor;
- ``Weights.normal`` copies Gaussian values from a pool at random offsets
  instead of drawing each value (about ten times faster; values do not matter).

The language model is written in F16, as the converter's ``--outtype f16``,
then quantised by llama.cpp's own quantiser (``llama_model_quantize``) to the
type the published file's name gives (Q4_K_M for most); the projector is
written as published (Q8_0 or F16, from ``REAL_SHAPES``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from vlmduo.models import fixtures
from vlmduo.models.fixtures import qwen_vocab
from vlmduo.models.fixtures.common import Weights, digest

BUILD_VERSION = 1
# Called as progress(description, done, total); total 0 when unknown.
BuildProgress = Callable[[str, float, float], None]

# llama.cpp file types by the tag in a published file's name (llama_ftype values).
QUANT_TYPES: dict[str, int] = {"Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2}
DEFAULT_QUANT = "Q4_K_M"
# Average bits per weight of each type (for the disk-space estimate only).
_BITS = {"Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q5_K_M": 5.7, "Q6_K": 6.6, "Q8_0": 8.5, "Q4_0": 4.5}
_QUANT_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_build_lock = threading.Lock()


@dataclass(frozen=True)
class RealSizeSpec:
    """What to build for one registry name, and where it goes."""

    name: str
    family: str
    params: dict[str, Any]  # the builder's Shape kwargs (REAL_SHAPES, LM written as f16)
    quant: str  # llama.cpp type of the language model, e.g. "Q4_K_M"
    published: str  # the published files this imitates (repo: model, projector)
    dims_source: str  # where the dimensions come from
    folder: Path
    published_gb: float | None = None  # the published files' size, both together

    @property
    def model_path(self) -> Path:
        """The quantised language model."""
        return self.folder / "model.gguf"

    @property
    def mmproj_path(self) -> Path:
        """The projector, as published."""
        return self.folder / "mmproj.gguf"

    @property
    def info_path(self) -> Path:
        """Provenance and build figures (JSON)."""
        return self.folder / "build.json"

    def built(self) -> bool:
        """True when both files and the build record are in the cache."""
        return self.model_path.exists() and self.mmproj_path.exists() and self.info_path.exists()


def real_shape_names() -> dict[str, str]:
    """Every name some family builder has a real shape for, with its family."""
    names: dict[str, str] = {}
    for family in fixtures.FAMILIES:
        for name in getattr(fixtures.builder(family), "REAL_SHAPES", {}):
            names[name] = family
    return names


def quant_of(file_name: str | None) -> str:
    """The llama.cpp type named in a published file name (``...-Q4_K_M.gguf``)."""
    upper = (file_name or "").upper()
    for tag in sorted(QUANT_TYPES, key=len, reverse=True):
        if tag in upper:
            return tag
    return DEFAULT_QUANT


def spec_for(name: str, cache: Path) -> RealSizeSpec:
    """The build of registry model ``name`` at its real shape; ValueError when it has none."""
    from vlmduo.models import registry

    entry = registry.load_registry().model(name)
    shapes = real_shape_names()
    family = entry.family if entry.family in fixtures.FAMILIES else shapes.get(name)
    module = fixtures.builder(family) if family else None
    real = getattr(module, "REAL_SHAPES", {}) if module else {}
    if name not in real:
        known = ", ".join(sorted(shapes)) or "none"
        raise ValueError(f"no real shape for '{name}': simulated models exist for {known}")
    params = dict(real[name])
    fields = {f.name for f in dataclasses.fields(module.Shape)}
    if "lm_ftype" in fields:
        params["lm_ftype"] = "f16"  # what llama-quantize starts from
    if "vocab" in fields and qwen_vocab.available():
        # The published tokenizer: a prompt costs the tokens it costs the real model (the
        # tiny one splits text into about twice as many).
        params["vocab"] = "qwen"
    quant = quant_of(entry.file)
    module_file = f"vlmduo/fixtures/{module.__name__.rsplit('.', 1)[-1]}.py"
    shape = fixtures.parse({"family": family, **params})[1]
    builder = fixtures.digest_name(module)
    key = digest(shape, extra=f"{builder}:{getattr(module, 'VERSION', 1)}:{quant}:{BUILD_VERSION}")
    return RealSizeSpec(
        name=name,
        family=family,
        params=params,
        quant=quant,
        published=f"{entry.repo}: {entry.file}, {entry.mmproj}" if entry.repo else name,
        dims_source=f"{module_file} REAL_SHAPES[{name!r}], from the published config.json",
        folder=cache / f"{name}-{key}",
        published_gb=entry.size_gb,
    )


def estimate_bytes(spec: RealSizeSpec) -> dict[str, int]:
    """Rough sizes for the disk check: the F16 language model, the final files, the peak."""
    shape = fixtures.parse({"family": spec.family, **spec.params})[1]
    g = lambda field, default=0: int(getattr(shape, field, default) or default)  # noqa: E731
    d, layers, ff, heads = g("n_embd"), g("n_layer"), g("n_ff"), g("n_head", 1)
    head_dim = g("head_dim", d // heads)
    kv_heads = g("n_head_kv", heads)
    per_layer = d * head_dim * (2 * heads + 2 * kv_heads) + 3 * d * ff
    lm_params = 2 * g("n_vocab") * d + layers * per_layer  # output counted even when tied
    v_d = g("v_embd")
    vision = g("v_layer") * (4 * v_d * v_d + 2 * v_d * g("v_ff")) + 16 * v_d * v_d + 4 * v_d * d
    f16, mmproj = 2 * lm_params, 2 * vision
    final = int(lm_params * _BITS.get(spec.quant, 5.0) / 8) + mmproj
    # gguf-py's spool and the F16 file exist together while it is copied; then F16 + final.
    return {"f16": f16, "final": final, "peak": 2 * f16 + 2 * mmproj + final}


def check_disk(folder: Path, needed: int) -> None:
    """OSError naming the shortfall when ``folder``'s disk has less than ``needed`` bytes free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OSError(
            f"building needs about {needed / 1e9:.1f} GB free on {probe}, there are {free / 1e9:.1f} GB"
        )


def ensure_built(
    name: str,
    cache: Path,
    *,
    threads: int | None = None,
    progress: BuildProgress | None = None,
    verbose: bool = False,
) -> RealSizeSpec:
    """Build registry model ``name`` at its real shape into ``cache`` unless it is there."""
    return build_spec(spec_for(name, cache), threads=threads, progress=progress, verbose=verbose)


def build_spec(
    spec: RealSizeSpec,
    *,
    threads: int | None = None,
    progress: BuildProgress | None = None,
    verbose: bool = False,
) -> RealSizeSpec:
    """Build ``spec`` unless it is built: disk check, streamed write, quantisation, record.

    OSError when the disk is too small; nothing half-written is left behind.
    """
    with _build_lock:
        if spec.built():
            return spec
        check_disk(spec.folder, estimate_bytes(spec)["peak"])
        spec.folder.mkdir(parents=True, exist_ok=True)
        _build(spec, threads=threads, progress=progress or (lambda *_: None), verbose=verbose)
    return spec


def build_info(spec: RealSizeSpec) -> dict[str, Any]:
    """The build record of a built spec (provenance, sizes, times)."""
    return json.loads(spec.info_path.read_text(encoding="utf-8"))


def _build(spec: RealSizeSpec, *, threads: int | None, progress: BuildProgress, verbose: bool) -> None:
    module, shape = fixtures.parse({"family": spec.family, **spec.params})
    f16_path = spec.folder / "model-f16.gguf"
    times: dict[str, float] = {}
    try:
        start = time.perf_counter()
        with streaming_build(spec.name, progress):
            module.build(shape, f16_path, spec.mmproj_path, name=spec.name)
        times["write_s"] = time.perf_counter() - start
        f16_bytes = f16_path.stat().st_size
        start = time.perf_counter()
        quantize(f16_path, spec.model_path, spec.quant, threads=threads, progress=progress, verbose=verbose)
        times["quantize_s"] = time.perf_counter() - start
    finally:
        f16_path.unlink(missing_ok=True)
    info = {
        "name": spec.name,
        "family": spec.family,
        "shape": spec.params,
        "quant": spec.quant,
        "projector": getattr(shape, "mmproj_ftype", "as published"),
        "published": spec.published,
        "published_gb": spec.published_gb,
        "dims_source": spec.dims_source,
        "bytes": {
            "f16": f16_bytes,
            "model": spec.model_path.stat().st_size,
            "mmproj": spec.mmproj_path.stat().st_size,
        },
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "weights": "random (a Gaussian pool at random offsets): answers are noise, latency is real",
    }
    spec.info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# -- the two seams ----------------------------------------------------------------------


class PoolWeights(Weights):
    """``Weights`` whose Gaussian values are copied from a pool at random offsets.

    Drawing 8 billion values one by one takes minutes; copying them takes
    seconds. The tensors are still random-looking and scaled as the builder
    asks; no computation in llama.cpp depends on the values' statistics.
    """

    POOL = 1 << 22
    CHUNK = 1 << 20

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.pool = self.rng.standard_normal(self.POOL, dtype=np.float32)

    def normal(self, shape: tuple[int, ...], std: float, dtype: Any = np.float32) -> np.ndarray:
        """Gaussian values of a given standard deviation (pool copies)."""
        n = int(np.prod(shape, dtype=np.int64))
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, self.CHUNK):
            k = min(self.CHUNK, n - start)
            offset = int(self.rng.integers(0, self.POOL - k + 1))
            np.multiply(self.pool[offset : offset + k], np.float32(std), out=out[start : start + k])
        return out.reshape(shape).astype(dtype, copy=False)


def _spooling_writer(base: type, progress: BuildProgress, label: str) -> type:
    """A ``GGUFWriter`` that spools tensors to disk beside its output as they are added."""

    class SpoolingWriter(base):  # type: ignore[misc, valid-type]
        def __init__(self, path: Any, arch: str, *args: Any, **kwargs: Any) -> None:
            kwargs["use_temp_file"] = True
            super().__init__(path, arch, *args, **kwargs)
            self.temp_file = tempfile.TemporaryFile(dir=Path(path).parent, prefix=".spool-")
            self._file = f"{label} {Path(path).name.split('.')[0]}"
            self._spooled = self._done = 0

        def add_tensor(self, name: str, tensor: np.ndarray, *args: Any, **kwargs: Any) -> None:
            super().add_tensor(name, tensor, *args, **kwargs)
            self._spooled += tensor.nbytes
            # Progress in blocks (layers): the block count is among the keys added first.
            blocks = next((v.value for k, v in self.kv_data[0].items() if k.endswith("block_count")), 0)
            found = re.search(r"blk\.(\d+)\.", name)
            self._done = max(self._done, int(found.group(1)) + 1 if found else 0)
            progress(f"{self._file}: {self._spooled / 1e9:.1f} GB written", self._done, blocks)

    return SpoolingWriter


@contextlib.contextmanager
def streaming_build(label: str, progress: BuildProgress) -> Iterator[None]:
    """Within: every fixture builder writes through the spooling writer and pool weights.

    Changes module attributes (``gguf.GGUFWriter``, each builder's ``Weights``)
    and restores them on leaving; one build at a time.
    """
    import gguf

    modules: list[ModuleType] = [fixtures.builder(family) for family in fixtures.FAMILIES]
    saved_writer = gguf.GGUFWriter
    saved = [(m, m.Weights) for m in modules if hasattr(m, "Weights")]
    gguf.GGUFWriter = _spooling_writer(saved_writer, progress, label)
    for module, _ in saved:
        module.Weights = PoolWeights
    try:
        yield
    finally:
        gguf.GGUFWriter = saved_writer
        for module, original in saved:
            module.Weights = original


# -- llama.cpp's quantiser --------------------------------------------------------------


def quantize(
    source: Path,
    target: Path,
    quant: str,
    *,
    threads: int | None = None,
    progress: BuildProgress | None = None,
    max_buffer: int = 512 << 20,
    verbose: bool = False,
) -> None:
    """Quantise a GGUF language model with llama.cpp's ``llama_model_quantize``.

    Written through a temporary name and renamed; ``max_buffer`` caps the rows
    llama.cpp holds at once (its default is 8 GiB). RuntimeError on failure,
    with llama.cpp's own last error line.
    """
    import llama_cpp

    from vlmduo.engine import logs

    logs.install(verbose)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads or 0
    params.max_buf_size = max_buffer
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    outcome: dict[str, Any] = {}

    def run() -> None:  # on a worker thread, so that progress can be polled meanwhile
        import ctypes

        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        outcome.update(code=code, reason=logs.last_error("no reason logged"))

    worker = threading.Thread(target=run, name="vlmduo-quantize", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            if progress is not None:
                done, total = _quantize_progress()
                progress(f"llama.cpp quantising to {quant}", done, total)
        if outcome.get("code") != 0:
            raise RuntimeError(f"llama.cpp could not quantise {source.name}: {outcome.get('reason')}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _quantize_progress() -> tuple[int, int]:
    """(tensors done, tensors) from llama.cpp's latest ``[  i/  n] name ...`` log line."""
    from vlmduo.engine import logs

    for line in reversed(logs.recent_lines(50)):
        found = _QUANT_LINE.search(line)
        if found:
            return int(found.group(1)), int(found.group(2))
    return 0, 0
