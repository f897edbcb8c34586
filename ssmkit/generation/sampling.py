"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p.

The order and meaning follow transformers' logits processors: the repetition penalty first, then
temperature, top-k, top-p (nucleus) and min-p, then a draw. Each row draws from its own seeded stream
(:class:`RowGenerators`), so a row's tokens do not depend on the other rows of the batch; draws are
device tensor ops without host synchronisation, so a CUDA graph can capture them.

Dimensions: ``b`` batch, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """logits (b, V), seen (b, V) bool -> logits with seen tokens made less likely by ``penalty`` (a number,
    or (b, 1) per row: a row's 1 leaves it exactly as it is)."""
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on (b, V) float logits; removed tokens get -inf."""
    return filter_rows(logits, RowSampling.uniform(params, logits.shape[0], logits.device))


@dataclasses.dataclass(frozen=True)
class SamplingKinds:
    """Which steps of sampling any row of a batch needs (host flags: what a decode step computes, so a
    CUDA graph is captured per combination). A step that some rows skip is an exact no-op for them
    (penalty 1, top_k 0, top_p 1, min_p 0), so a row's token never depends on the other rows' settings."""

    penalty: bool = False
    sample: bool = False
    greedy: bool = True
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False

    @classmethod
    def of(cls, params: Iterable[SamplingParams]) -> SamplingKinds:
        params = list(params)
        return cls(penalty=any(p.repetition_penalty != 1.0 for p in params),
                   sample=any(not p.greedy for p in params), greedy=any(p.greedy for p in params),
                   top_k=any(p.top_k > 0 and not p.greedy for p in params),
                   top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
                   min_p=any(p.min_p > 0 and not p.greedy for p in params))


@dataclasses.dataclass
class RowSampling:
    """Per-row :class:`SamplingParams` as device tensors, so one step samples rows with different settings.

    temperature, top_p, min_p, penalty: (b,) float32; top_k: (b,) int64 (0: off); greedy: (b,) bool (their
    temperature is stored as 1, never used); kinds: the steps any row needs.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    penalty: torch.Tensor
    greedy: torch.Tensor
    kinds: SamplingKinds = SamplingKinds()

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> RowSampling:
        """``rows`` rows of neutral (greedy, no filter) settings, to be set with :meth:`set_row`."""
        ones = torch.ones(rows, device=device)
        return cls(ones.clone(), torch.zeros(rows, dtype=torch.int64, device=device), ones.clone(),
                   torch.zeros(rows, device=device), ones.clone(), torch.ones(rows, dtype=torch.bool, device=device))

    @classmethod
    def uniform(cls, params: SamplingParams, rows: int, device: torch.device) -> RowSampling:
        """Every row with ``params``."""
        out = cls.empty(rows, device)
        for name, value in _row_values(params).items():
            getattr(out, name).fill_(value)
        out.kinds = SamplingKinds.of([params])
        return out

    def set_row(self, row: int, params: SamplingParams) -> None:
        for name, value in _row_values(params).items():
            getattr(self, name)[row] = value

    def copy_row(self, dst: int, src: int) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.temperature, self.top_k, self.top_p, self.min_p, self.penalty, self.greedy

    def head(self, rows: int, kinds: SamplingKinds) -> RowSampling:
        """The first ``rows`` rows (views: later :meth:`set_row` calls show through), with ``kinds``."""
        return RowSampling(*(t[:rows] for t in self.tensors()), kinds=kinds)


def _row_values(p: SamplingParams) -> dict[str, float | int | bool]:
    return {"temperature": 1.0 if p.greedy else p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "min_p": p.min_p, "penalty": p.repetition_penalty, "greedy": p.greedy}


def filter_rows(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p, each row with its own settings, on (b, V) float logits;
    removed tokens get -inf. Only the steps ``rows.kinds`` names run (the others are no-ops anyway)."""
    kinds = rows.kinds
    logits = logits / rows.temperature[:, None]
    if kinds.top_k:
        vocab = logits.shape[-1]
        k = torch.where(rows.top_k > 0, rows.top_k, vocab).clamp(max=vocab)
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if kinds.top_p:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first is always kept).
        drop_sorted = (probs.cumsum(-1) - probs >= rows.top_p[:, None]) & (rows.top_p < 1.0)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    if kinds.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < rows.min_p[:, None] * probs.amax(-1, keepdim=True), -torch.inf)
    return logits


class RowGenerators:
    """Independent, seeded random streams, one per row, that live on the device.

    A draw for row i depends only on (seed_i, number of draws row i made before), through a counter-based
    hash, so a row's tokens do not depend on the other rows, the same seeds give the same tokens on every
    run, and a draw is made of plain tensor ops with no host synchronisation: a CUDA graph can capture
    it (the draw counters are device tensors updated in place).

    seeds: (b,) int64, each in [0, 2**62); draws: (b,) int64, draws made so far (default none; a given
    tensor is updated in place, e.g. rows of a serving engine's storage).
    """

    def __init__(self, seeds: torch.Tensor, draws: torch.Tensor | None = None) -> None:
        self.seeds = seeds
        self.draws = torch.zeros_like(seeds) if draws is None else draws

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
    return sample_rows(logits, RowSampling.uniform(params, logits.shape[0], logits.device), seen=seen,
                       generators=generators)


def sample_rows(logits: torch.Tensor, rows: RowSampling, *, seen: torch.Tensor | None = None,
                generators: RowGenerators | None = None) -> torch.Tensor:
    """:func:`sample_next` with settings per row: logits (b, V), seen (b, V) bool -> (b,) long.

    A row's token is what :func:`sample_next` picks for it alone with its settings and stream: the steps
    other rows need are exact no-ops for it, and every op is row-wise. Greedy rows draw no noise but
    their stream's counter advances (a greedy row's stream is never read).
    """
    kinds = rows.kinds
    logits = logits.float()
    if seen is not None and kinds.penalty:
        logits = apply_repetition_penalty(logits, seen, rows.penalty[:, None])
    if not kinds.sample:
        return logits.argmax(-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one random stream per row (make_generators)")
    probs = filter_rows(logits, rows).softmax(-1)
    token = (probs / generators.exponential(probs.shape[-1])).argmax(-1)
    return torch.where(rows.greedy, logits.argmax(-1), token) if kinds.greedy else token
