"""Generation: sampling, and ``generate`` / ``stream`` with chunked prefill and batches of prompts of different
lengths, through any model that follows :class:`ssmkit.generation.decode.DecodingModel` (the cache it reads and
fills is the model's: :class:`ssmkit.models.ModelCache`)."""

from ssmkit.generation.generate import generate, stream
from ssmkit.generation.graph_cache import clear_graph_cache
from ssmkit.generation.sampling import SamplingParams, sample_next

__all__ = ["SamplingParams", "clear_graph_cache", "generate", "sample_next", "stream"]
