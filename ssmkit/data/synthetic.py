"""Synthetic tasks from the SSM papers, generated on the fly: selective copying, induction heads,
multi-query associative recall (MQAR) and needle-in-a-haystack prompts for byte models.

Every token task returns a :class:`SyntheticBatch`: ``inputs`` (b, l) token ids and ``targets`` (b, l)
with the answer expected *at* each scored position (the model reads ``inputs[:, :t + 1]`` and must output
``targets[:, t]``) and :data:`IGNORE` everywhere else. The answers are known by construction, so the
accuracy of a model is the fraction of scored positions where its argmax equals the target. Generators
take a ``torch.Generator`` so a seed fixes every batch.

Dimensions: ``b`` batch, ``l`` length (context plus answer positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmkit.data.packing import IGNORE


@dataclass(frozen=True)
class SyntheticBatch:
    """inputs: (b, l) int64 token ids; targets: (b, l) int64, the answer at scored positions, else IGNORE."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def n_scored(self) -> int:
        return int((self.targets != IGNORE).sum())


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def selective_copying_vocab(n_values: int) -> int:
    """Vocabulary of :func:`selective_copying`: noise 0, values 1..n_values, the marker n_values + 1."""
    return n_values + 2


def selective_copying(batch_size: int, seq_len: int, n_memorize: int, n_values: int, *,
                      generator: torch.Generator | None = None) -> SyntheticBatch:
    """Selective copying (Gu & Dao 2023, Mamba, section 3.1 and appendix E.1).

    A context of ``seq_len`` tokens is noise (token 0) except ``n_memorize`` data tokens (values in
    ``1..n_values``) at random positions; then ``n_memorize`` marker tokens (``n_values + 1``) follow, and
    at the i-th marker the model must output the i-th data token of the context. The spacing is random,
    so a time-invariant convolution cannot know where to look: the task needs content-aware selection.

    Returns inputs and targets of shape (b, seq_len + n_memorize); only the marker positions are scored.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, n_memorize=n_memorize, n_values=n_values)
    if n_memorize > seq_len:
        raise ValueError(f"n_memorize={n_memorize} data tokens do not fit in a context of seq_len={seq_len}")
    data = torch.randint(1, n_values + 1, (batch_size, n_memorize), generator=generator)
    # Random distinct positions, in increasing order so the data keep their order in the context.
    positions = torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :n_memorize].sort(dim=1).values
    context = torch.zeros(batch_size, seq_len, dtype=torch.long)
    context.scatter_(1, positions, data)
    markers = torch.full((batch_size, n_memorize), n_values + 1, dtype=torch.long)
    inputs = torch.cat([context, markers], dim=1)
    targets = torch.cat([torch.full_like(context, IGNORE), data], dim=1)
    return SyntheticBatch(inputs, targets)


def induction_heads(batch_size: int, seq_len: int, vocab_size: int, *,
                    generator: torch.Generator | None = None) -> SyntheticBatch:
    """Induction heads (Olsson et al. 2022; the H3 / Mamba setup, Mamba section 4.1.2).

    Random tokens from ``0..vocab_size - 2``; the trigger token ``vocab_size - 1`` appears exactly twice:
    once at a random position followed by the answer token, and once at the last position, where the
    model must output the token that followed its first occurrence. Only the last position is scored.

    Returns inputs and targets of shape (b, seq_len).
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size)
    if seq_len < 3 or vocab_size < 3:
        raise ValueError(f"induction heads need seq_len >= 3 and vocab_size >= 3, got {seq_len} and {vocab_size}")
    trigger = vocab_size - 1
    inputs = torch.randint(0, trigger, (batch_size, seq_len), generator=generator)
    # The first trigger is followed by its answer, and both precede the final trigger.
    first = torch.randint(0, seq_len - 2, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)
    inputs[rows, first] = trigger
    inputs[:, -1] = trigger
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = inputs[rows, first + 1]
    return SyntheticBatch(inputs, targets)


def mqar(batch_size: int, seq_len: int, n_kv: int, vocab_size: int, *,
         generator: torch.Generator | None = None) -> SyntheticBatch:
    """Multi-query associative recall (Arora et al. 2023, Zoology, section 3).

    The sequence starts with ``n_kv`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from
    ``1..vocab_size/2 - 1``, values from ``vocab_size/2..vocab_size - 1``); every key is then queried once,
    in random order, at random places of the rest of the sequence (filled with token 0): the query key
    ``k`` is followed by its value, and at the key the model must output that value. Needs
    ``seq_len >= 4 * n_kv`` (pairs plus queries each take 2 positions).

    Returns inputs and targets of shape (b, seq_len); the ``n_kv`` query positions are scored.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, n_kv=n_kv, vocab_size=vocab_size)
    if seq_len < 4 * n_kv:
        raise ValueError(f"mqar: seq_len={seq_len} is too short for n_kv={n_kv} (needs >= 4 * n_kv)")
    half = vocab_size // 2
    if half - 1 < n_kv:
        raise ValueError(f"mqar: vocab_size={vocab_size} has fewer than n_kv={n_kv} distinct keys")
    rows = torch.arange(batch_size)[:, None]
    keys = 1 + torch.rand(batch_size, half - 1, generator=generator).argsort(dim=1)[:, :n_kv]
    values = torch.randint(half, vocab_size, (batch_size, n_kv), generator=generator)
    inputs = torch.zeros(batch_size, seq_len, dtype=torch.long)
    inputs[:, 0:2 * n_kv:2] = keys
    inputs[:, 1:2 * n_kv:2] = values
    # The query part holds (seq_len - 2 n_kv) // 2 slots of two positions; n_kv of them, chosen at
    # random, get a query (each key once, in random order).
    n_slots = (seq_len - 2 * n_kv) // 2
    slots = torch.rand(batch_size, n_slots, generator=generator).argsort(dim=1)[:, :n_kv]
    order = torch.rand(batch_size, n_kv, generator=generator).argsort(dim=1)
    query_pos = 2 * n_kv + 2 * slots
    inputs[rows, query_pos] = keys.gather(1, order)
    inputs[rows, query_pos + 1] = values.gather(1, order)
    targets = torch.full_like(inputs, IGNORE)
    targets[rows, query_pos] = values.gather(1, order)
    return SyntheticBatch(inputs, targets)


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle-in-a-haystack prompt: ``prompt`` ends with the question, ``answer`` is what must follow;
    the needle line starts at byte ``needle_offset`` of the prompt."""

    prompt: bytes
    answer: bytes
    needle_offset: int


NEEDLE_LINE = b"\n# the secret code of %s is %s\n"
NEEDLE_QUESTION = b"\n# the secret code of %s is "


def needle_prompt(haystack: bytes, length: int, depth: float, *, generator: torch.Generator | None = None,
                  key_len: int = 4, value_len: int = 5) -> NeedlePrompt:
    """A prompt of exactly ``length`` bytes: text from ``haystack`` with the line
    ``# the secret code of KEY is VALUE`` hidden at ``depth`` (0 = start, 1 = just before the question)
    and ending with the question ``# the secret code of KEY is ``; the answer is VALUE.

    KEY is ``key_len`` random lowercase letters and VALUE ``value_len`` random digits. The text is a
    random window of ``haystack`` (which must be at least ``length`` bytes); the needle is placed at the
    line break nearest to the requested depth, so it interrupts no line.
    """
    _check_positive(length=length, key_len=key_len, value_len=value_len)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = bytes((torch.randint(0, 26, (key_len,), generator=generator) + ord("a")).tolist())
    value = bytes((torch.randint(0, 10, (value_len,), generator=generator) + ord("0")).tolist())
    needle, question = NEEDLE_LINE % (key, value), NEEDLE_QUESTION % key
    text_len = length - len(needle) - len(question)
    if text_len < 0:
        raise ValueError(f"length={length} is too short for the needle and question ({len(needle) + len(question)} "
                         "bytes)")
    if len(haystack) < text_len:
        raise ValueError(f"the haystack has {len(haystack)} bytes, fewer than the {text_len} this prompt needs")
    start = int(torch.randint(0, len(haystack) - text_len + 1, (1,), generator=generator))
    text = haystack[start:start + text_len]
    at = round(depth * text_len)
    if 0 < at < text_len:
        # Just after the nearest line break on either side, if there is one.
        near = [i + 1 for i in (text.rfind(b"\n", 0, at), text.find(b"\n", at)) if i >= 0]
        at = min(near, key=lambda b: abs(b - at), default=at)
    prompt = text[:at] + needle + text[at:] + question
    return NeedlePrompt(prompt, value, at)


def needle_batch(haystack: bytes, batch_size: int, length: int, depth: float | None, *, bos_id: int | None = None,
                 generator: torch.Generator | None = None, value_len: int = 5) -> SyntheticBatch:
    """``batch_size`` :func:`needle_prompt` rows as byte ids (an optional ``bos_id`` first), each followed by its
    answer but the last byte, with the answer bytes scored where they are due (teacher forcing: the
    model answers right iff greedy decoding from the prompt would). ``depth`` None = random per row.

    Returns inputs and targets of shape (b, [1 +] length + value_len - 1).
    """
    _check_positive(batch_size=batch_size)
    rows, answers = [], []
    for _ in range(batch_size):
        d = float(torch.rand((), generator=generator)) if depth is None else depth
        example = needle_prompt(haystack, length, d, generator=generator, value_len=value_len)
        rows.append(([] if bos_id is None else [bos_id]) + list(example.prompt + example.answer[:-1]))
        answers.append(list(example.answer))
    inputs = torch.tensor(rows, dtype=torch.long)
    targets = torch.full_like(inputs, IGNORE)
    first = inputs.shape[1] - value_len
    targets[:, first:] = torch.tensor(answers, dtype=torch.long)
    return SyntheticBatch(inputs, targets)
