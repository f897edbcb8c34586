"""Keys of the prefix cache: a hash chain over blocks of token ids, and rolling hashes of a block's tails.

``chain[0]`` is a fixed root; ``chain[j+1] = blake2b(chain[j] || block j)`` (16 bytes), so ``chain[j]``
stands for the first ``j`` whole blocks of :data:`BLOCK_TOKENS` tokens. The tokens after the last whole
block (the tail) are kept exactly by the cache and found by a polynomial rolling hash (mod 2**61 - 1,
with a per-process random multiplier), then compared token by token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BLOCK_TOKENS = 64
_ROOT = hashlib.blake2b(b"ssmkit-prefix-chain-v1", digest_size=16).digest()
MODULUS = (1 << 61) - 1


def chain_next(chain: bytes, block: Sequence[int]) -> bytes:
    """The chain hash after one more block of token ids."""
    return hashlib.blake2b(chain + array("q", block).tobytes(), digest_size=16).digest()


class PrefixKeys:
    """The hash chain of one prompt: ``chain[j]`` keys its first ``j`` full blocks (computed once, O(length))."""

    def __init__(self, ids: Sequence[int], multiplier: int) -> None:
        self.ids = list(ids)
        self._mult = multiplier
        self.chain = [_ROOT]
        for j in range(len(self.ids) // BLOCK_TOKENS):
            self.chain.append(chain_next(self.chain[-1], self.ids[j * BLOCK_TOKENS:(j + 1) * BLOCK_TOKENS]))

    def tail_hashes(self, j: int, longest: int) -> list[int]:
        """Rolling hashes of the tails ``ids[jB : jB + l]`` for l = 0..longest (O(longest))."""
        out, h, base = [0], 0, j * BLOCK_TOKENS
        for t in self.ids[base:base + longest]:
            h = (h * self._mult + t + 1) % MODULUS
            out.append(h)
        return out

    def key(self, n: int) -> tuple[bytes, int, int]:
        """(chain hash, tail length, tail hash) of the prefix of ``n`` tokens."""
        j, tail = divmod(n, BLOCK_TOKENS)
        return self.chain[j], tail, self.tail_hashes(j, tail)[-1]
