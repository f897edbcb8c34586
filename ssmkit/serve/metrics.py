"""``GET /metrics``: the server's counters in Prometheus' text exposition format (version 0.0.4).

Every metric is named ``ssmkit_*``, with ``# HELP`` and ``# TYPE`` lines; counters end in ``_total``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ssmkit.serve.completions import Server

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help, where the value comes from: "engine.<attr>", "decoder.<attr>" (the engine's batched
# decoder), "store.<key>" or "prefix.<key>")
_METRICS = [
    ("requests_in_flight", "gauge", "Requests held by the generation engine.", "engine.in_flight"),
    ("decode_steps_total", "counter", "Batched decode steps run.", "engine.steps"),
    ("tokens_generated_total", "counter", "Tokens sampled.", "engine.tokens"),
    ("prefill_forwards_total", "counter", "Prompt-reading forwards (a batch of new prompts, or one request's chunk).",
     "engine.prefills"),
    ("prefill_rows_total", "counter", "Requests read by the prompt-reading forwards, summed.", "engine.prefill_rows"),
    ("decode_rows_total", "counter", "Request rows decoded, summed over the batched decode steps.", "decoder.rows"),
    ("decode_padded_rows_total", "counter", "Padding rows computed to fill a CUDA graph's batch-size bucket.",
     "decoder.padded_rows"),
    ("cuda_graphs_captured_total", "counter", "Decode steps captured as CUDA graphs.", "decoder.captures"),
    ("sessions", "gauge", "Open sessions.", "store.sessions"),
    ("session_memory_bytes", "gauge", "Bytes of session states held in memory.", "store.memory_bytes"),
    ("session_disk_bytes", "gauge", "Bytes of session files on disk.", "store.disk_bytes"),
    ("session_disk_quota_bytes", "gauge", "Disk quota of the sessions.", "store.disk_quota"),
    ("prefix_cache_hits_total", "counter", "Prompts that resumed from a cached prefix state.", "prefix.hits"),
    ("prefix_cache_misses_total", "counter", "Prompts read from the zero state.", "prefix.misses"),
    ("prefix_cache_tokens_saved_total", "counter", "Prompt tokens not read thanks to a cached prefix state.",
     "prefix.tokens_saved"),
    ("prefix_cache_prompt_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
     "prefix.tokens_looked_up"),
    ("prefix_cache_snapshots_total", "counter", "Prefix states stored.", "prefix.snapshots"),
    ("prefix_cache_evictions_total", "counter", "Prefix states evicted from memory.", "prefix.evictions"),
    ("prefix_cache_entries", "gauge", "Prefix states held in memory.", "prefix.entries_in_memory"),
    ("prefix_cache_memory_bytes", "gauge", "Bytes of prefix states in memory.", "prefix.memory_bytes"),
    ("prefix_cache_memory_budget_bytes", "gauge", "Memory budget of the prefix cache.", "prefix.memory_budget"),
    ("prefix_cache_disk_entries", "gauge", "Prefix states on disk.", "prefix.entries_on_disk"),
    ("prefix_cache_disk_bytes", "gauge", "Bytes of prefix state files on disk.", "prefix.disk_bytes"),
    ("prefix_cache_disk_budget_bytes", "gauge", "Disk budget of the prefix cache.", "prefix.disk_budget"),
    ("prefix_cache_disk_hits_total", "counter", "Prefix states read back from disk.", "prefix.disk_hits"),
    ("prefix_cache_disk_writes_total", "counter", "Prefix states written to disk.", "prefix.disk_writes"),
]


def render(server: Server) -> str:
    """The exposition text: one ``# HELP``, one ``# TYPE`` and one sample line per metric."""
    store = server.store.stats()
    prefix = server.prefix.stats() if server.prefix is not None else {}
    lines = []
    for name, kind, text, source in _METRICS:
        where, key = source.split(".")
        if where == "engine":
            value = getattr(server.engine, key)
        elif where == "decoder":
            value = getattr(server.engine.decoder, key)
        elif where == "store":
            value = store[key]
        else:
            value = prefix.get(key, 0)
        lines += [f"# HELP ssmkit_{name} {text}", f"# TYPE ssmkit_{name} {kind}", f"ssmkit_{name} {int(value)}"]
    up = 1 if server.engine.alive else 0
    lines += ["# HELP ssmkit_engine_up 1 while the generation engine runs.", "# TYPE ssmkit_engine_up gauge",
              f"ssmkit_engine_up {up}"]
    return "\n".join(lines) + "\n"
