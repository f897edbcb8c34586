"""ssmkit: state space sequence models on PyTorch.

Importing ssmkit never needs Triton or a GPU; optional backends are probed lazily
(:mod:`ssmkit.ops.backend`).
"""

__version__ = "0.1.0"
