"""What a client asks of the serving engine: one request, read then sampled (:class:`GenerationRequest`).

Its own module so that the engine (``batching.py``) and its prompt reading (``engine_prompts.py``) both
take it from below, with no import circle between them.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

from ssmkit.generation.sampling import SamplingParams
from ssmkit.models.cache import ModelCache
from ssmkit.serve.prefix_cache import PrefixPlan


@dataclasses.dataclass(eq=False)
class GenerationRequest:
    """One request for the engine: read ``ids`` into a cache, then sample up to ``max_new_tokens``.

    ``on_token(token)`` is called from the engine thread with every new token and returns True to end the
    request there (e.g. a stop string was completed). ``on_done(finish_reason, cache)`` is called once at
    the end: ``finish_reason`` is ``"stop"`` (an eos id, or ``on_token`` said so), ``"length"``,
    ``"cancelled"`` or ``"error: <message>"``; ``cache`` is the (batch 1) state after the prompt and every
    sampled token except the last (which a caller may feed later), or None unless ``keep_state``.
    With ``max_new_tokens == 0`` the request only reads ``ids`` (the cache then holds all of them).
    ``prefix`` (only with ``cache=None``): resume from a prefix-cache snapshot of the first ``prefix.start``
    tokens of ``ids`` and snapshot the state where the plan says (:mod:`ssmkit.serve.prefix_cache`).
    """

    ids: Sequence[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    on_token: Callable[[int], bool]
    on_done: Callable[[str, ModelCache | None], None]
    eos_ids: tuple[int, ...] = ()
    cache: ModelCache | None = None
    keep_state: bool = False
    prefix: PrefixPlan | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next turn (thread-safe)."""
        self.cancelled.set()
