"""A loaded VLM and the contexts over it: what agents, benchmarks and tests hold.

``Weights`` (``vlmduo.engine.weights``) loads the model and projector once; a
``VisionLanguageModel`` adds the llama contexts over them (``vlmduo.engine.session``).
KV state lives in a ``Context`` owned by whoever uses it: each agent gets its own, as
llama.cpp shares one model between several contexts, so the same model can serve as
small and large agent at once.
"""

from __future__ import annotations

from pathlib import Path

from vlmduo.engine.session import Context, Session
from vlmduo.engine.settings import EngineSettings
from vlmduo.engine.weights import Weights
from vlmduo.errors import ModelError


class VisionLanguageModel(Weights):
    """A GGUF language model plus its projector, loaded once and kept, with its contexts."""

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path | None,
        settings: EngineSettings | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self._default: Context | None = None
        self._contexts: list[Context] = []
        super().__init__(model_path, mmproj_path, settings, name=name)

    def _open_contexts(self) -> None:
        # Probe the context size once, so a too-small setting fails at load.
        self._default = self.new_context()
        self.n_ctx, self.n_batch = self._default.n_ctx, self._default.n_batch

    def new_context(self) -> Context:
        """A fresh llama context (its own KV cache) over these weights."""
        context = Context(self)
        self._contexts.append(context)
        return context

    @property
    def default_context(self) -> Context:
        """The context ``session()`` uses (agents of their own use ``new_context``)."""
        if self._default is None:
            raise ModelError(f"{self.name} is closed")
        return self._default

    def session(self) -> Session:
        """A fresh conversation in this model's default context (its previous one ends)."""
        return self.default_context.session()

    def close(self) -> None:
        """Free every context, then the weights; safe to call twice and after a failed load."""
        for context in self._contexts:
            context.close()
        self._contexts.clear()
        self._default = None
        super().close()
