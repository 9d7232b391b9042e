"""llama.cpp sampler chains: grammar, log-probability probe, selection.

A step's sampling runs in C (``llama_sampler_sample``): no Python work per
vocabulary entry. ``make_sampler`` builds the chain a ``Session`` decodes with.
"""

from __future__ import annotations

import ctypes
import math
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


def make_sampler(
    model: Weights,
    grammar: str | None,
    temperature: float,
    seed: int,
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
    _add_selection(chain, temperature, seed)
    return chain


def _add_selection(chain: object, temperature: float, seed: int) -> None:
    """Greedy at temperature 0, else top-k 40, top-p 0.95, temperature, seeded draw."""
    import llama_cpp

    if temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(40))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(0.95, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))


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
