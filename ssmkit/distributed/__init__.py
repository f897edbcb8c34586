"""Work spread over processes with ``torch.distributed``: context parallelism (one sequence, several ranks).

Data parallelism (DDP / FSDP2) lives with the trainer (:mod:`ssmkit.train.distributed`); this package holds
what layers need when a sequence itself is split across ranks.
"""

from ssmkit.distributed.context_parallel import (
    ContextParallel,
    context_parallel_chunk_scan,
    previous_rank_tail,
    split_sequence,
)

__all__ = ["ContextParallel", "context_parallel_chunk_scan", "previous_rank_tail", "split_sequence"]
