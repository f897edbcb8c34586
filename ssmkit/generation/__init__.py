"""Generation: per-layer state caches (values you can clone, save and load), sampling, and
``generate`` / ``stream`` with chunked prefill and batches of prompts of different lengths."""

from ssmkit.generation.cache import ModelCache
from ssmkit.generation.generate import generate, stream
from ssmkit.generation.sampling import SamplingParams, sample_next

__all__ = ["ModelCache", "SamplingParams", "generate", "sample_next", "stream"]
