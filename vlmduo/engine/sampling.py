"""llama.cpp sampler chains: grammar, log-probability probe, selection.

A step's sampling runs in C (``llama_sampler_sample``): no Python work per
vocabulary entry. ``make_sampler`` builds the chain a ``Session`` decodes with.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmduo.engine import logs
from vlmduo.errors import EngineError

if TYPE_CHECKING:
    from vlmduo.engine.weights import Weights


def _grammar_sampler(model: Weights, grammar: str) -> object:
    import llama_cpp

    g = llama_cpp.llama_sampler_init_grammar(model._vocab, grammar.encode(), b"root")
    if not g:
        raise EngineError("llama.cpp rejected the answer grammar: " + logs.last_error())
    return g


@dataclass(frozen=True)
class SamplerSettings:
    """How a generation picks its tokens: greedy at temperature 0, else llama.cpp's
    samplers in llama.cpp's own order (penalties, top-k, top-p, min-p, temperature, a
    seeded draw). Zero top_k, one top_p, zero min_p and neutral penalties are off.

    The defaults are llama.cpp's own (``common_params_sampling``): what a model gets
    when its card publishes nothing.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64  # the generated tokens the penalties look back over
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """True when the most probable token is always taken."""
        return self.temperature <= 0.0

    def to_json(self) -> dict[str, float | int]:
        """What ``--json`` reports of an agent's sampling."""
        if self.greedy:
            return {"temperature": 0.0, "seed": self.seed}
        return dataclasses.asdict(self)


GREEDY = SamplerSettings(temperature=0.0)


def make_sampler(
    model: Weights,
    grammar: str | None,
    settings: SamplerSettings,
    probe: LogProbProbe | None = None,
) -> object:
    """One llama.cpp chain: [grammar], [the probe], selection; ``llama_sampler_sample``
    runs it on the logits in C, so a step costs no Python work per vocabulary entry."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if grammar:
        try:
            g = _grammar_sampler(model, grammar)
        except EngineError:
            llama_cpp.llama_sampler_free(chain)
            raise
        llama_cpp.llama_sampler_chain_add(chain, g)
    if probe is not None:
        probe.add_to(chain)
    _add_selection(chain, settings, model.n_vocab)
    return chain


def _add_selection(chain: object, s: SamplerSettings, n_vocab: int) -> None:
    """Greedy, or llama.cpp's order of samplers (``common_sampler_init``), each only when on."""
    import llama_cpp

    add = llama_cpp.llama_sampler_chain_add
    if s.greedy:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return
    if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
            ),
        )
    if s.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(s.seed))


class LogProbProbe:
    """Each sampled token's log-probability, read inside the sampler chain.

    Placed after the grammar (if any) and before selection: llama.cpp's ``dist``
    sampler writes every candidate's normalised probability (0 for the tokens the
    grammar masked), then a Python observer reads one candidate with p > 0, whose
    logit and probability give the log-normaliser: log Z = logit - log p. A token's
    log-probability is then its raw logit minus log Z: under the model's distribution
    at temperature 1, renormalised over what the grammar allows (a forced token gets
    0), whatever temperature and truncation the selection after it uses. The draw of
    ``dist`` is overridden by that selection.
    """

    def __init__(self) -> None:
        import llama_cpp

        self.log_z = math.nan
        # ctypes prints and drops what a callback raises (Ctrl-C included): kept here
        # and raised by ``logprob`` on the sampling thread.
        self.error: BaseException | None = None
        # Kept on self: llama.cpp holds pointers to the callback and the interface.
        self._apply = llama_cpp.llama_sampler_i_apply(self._observe)
        self._iface = llama_cpp.llama_sampler_i(apply=self._apply)

    def add_to(self, chain: object) -> None:
        """Append the probe's two samplers to ``chain`` (which then owns and frees them)."""
        import llama_cpp

        observer = llama_cpp.llama_sampler_init(ctypes.byref(self._iface), None)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(0))
        llama_cpp.llama_sampler_chain_add(chain, observer)

    def _observe(self, _sampler: object, cur_p: object) -> None:
        try:
            cur = cur_p.contents  # type: ignore[attr-defined]
            entry = cur.data[cur.selected] if cur.selected >= 0 else None
            if entry is None or not entry.p > 0.0:
                # dist drew a zero-probability candidate only if its random number was 0.
                entry = next(cur.data[i] for i in range(cur.size) if cur.data[i].p > 0.0)
            self.log_z = entry.logit - math.log(entry.p)
        except BaseException as exc:  # noqa: BLE001 - raised again by logprob
            self.error = exc

    def logprob(self, llama_ctx: object, token: int) -> float:
        """log p(``token``) at the step just sampled (each step's log Z is used once)."""
        import llama_cpp

        log_z, self.log_z = self.log_z, math.nan
        error, self.error = self.error, None
        if error is not None:
            raise error
        if math.isnan(log_z):
            raise EngineError("llama.cpp's sampler chain did not report a probability")
        return float(llama_cpp.llama_get_logits_ith(llama_ctx, -1)[token]) - log_z
