"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p.

The order and meaning follow transformers' logits processors: the repetition penalty first, then
temperature, top-k, top-p (nucleus) and min-p, then a draw. Each row draws from its own seeded stream
(:class:`RowGenerators`), so a row's tokens do not depend on the other rows of the batch; draws are
device tensor ops without host synchronisation, so a CUDA graph can capture them.

Dimensions: ``b`` batch, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax after the repetition penalty).

    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set of most likely tokens
    whose probabilities reach top_p (1: all). min_p: drop tokens less likely than min_p times the most
    likely one (0: none). repetition_penalty: divide positive logits (multiply negative ones) of tokens
    already seen, prompt included, by this factor (1: off), as transformers does.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (b, V), seen (b, V) bool -> logits with seen tokens made less likely by ``penalty``."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on (b, V) float logits; removed tokens get -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first is always kept).
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -torch.inf)
    return logits


class RowGenerators:
    """Independent, seeded random streams, one per row, that live on the device.

    A draw for row i depends only on (seed_i, number of draws row i made before), through a counter-based
    hash, so a row's tokens do not depend on the other rows, the same seeds give the same tokens on every
    run, and a draw is made of plain tensor ops with no host synchronisation: a CUDA graph can capture
    it (the draw counters are device tensors updated in place).

    seeds: (b,) int64, each in [0, 2**62); draws: (b,) int64, draws made so far.
    """

    def __init__(self, seeds: torch.Tensor) -> None:
        self.seeds = seeds
        self.draws = torch.zeros_like(seeds)

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def exponential(self, size: int) -> torch.Tensor:
        """(b, size) float32 Exp(1) noise (each value > 0), and advance every row's draw counter."""
        lo, hi = self.seeds & _MASK32, self.seeds >> 32
        key = _mix32(_mix32(_mix32(lo) ^ hi) ^ self.draws)
        index = torch.arange(size, device=self.seeds.device)
        bits = _mix32(_mix32(index[None] ^ key[:, None]) ^ _mix32(key ^ _SALT)[:, None])
        self.draws.add_(1)
        # 24 bits make a float32 uniform in (0, 1) exactly, so the noise is never 0 or inf.
        uniform = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24
        return -torch.log(uniform)


_MASK32 = 0xFFFFFFFF
_SALT = 0x2545F491


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values below 2**32.

    The multiplier is below 2**27, so no product overflows int64."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def make_generators(seed: int | list[int] | None, batch_size: int, device: torch.device) -> RowGenerators:
    """One random stream per row: ``seed`` (int: row i gets ``seed + i``; list: one seed per row) or, when
    None, seeds drawn from torch's global generator (so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is None:
        seeds = torch.randint(0, 2**62, (batch_size,)).tolist()
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed + i for i in range(batch_size)]
    elif isinstance(seed, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
        if len(seed) != batch_size:
            raise ValueError(f"seed has {len(seed)} values for {batch_size} prompts")
        seeds = list(seed)
    else:
        raise TypeError(f"seed must be an int, a list of ints (one per prompt) or None, got {seed!r}")
    if any(not 0 <= s < 2**62 for s in seeds):
        raise ValueError(f"seeds must be in [0, 2**62), got {seeds}")
    return RowGenerators(torch.tensor(seeds, dtype=torch.int64, device=device))


def sample_next(logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None,
                generators: RowGenerators | None = None) -> torch.Tensor:
    """Pick one token per row. logits (b, V); seen (b, V) bool for the repetition penalty -> (b,) long.

    Sampling needs ``generators`` (one stream per row, see :func:`make_generators`). A row draws by the
    exponential race ``argmax(p / E)`` with E ~ Exp(1) (the token of probability p wins with probability
    p, as ``torch.multinomial`` with one sample), with no host synchronisation.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one random stream per row (make_generators)")
    probs = filter_logits(logits, params).softmax(-1)
    return (probs / generators.exponential(probs.shape[-1])).argmax(-1)
