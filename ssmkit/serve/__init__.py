"""``ssmkit serve``: an HTTP server with streaming completions, continuous batching and stateful sessions.

The web stack (FastAPI, uvicorn, sse-starlette; ``pip install 'ssmkit[serve]'``) is imported only by
:mod:`ssmkit.serve.app` and :func:`ssmkit.serve.server.serve`, so ``import ssmkit`` never needs it.

- :mod:`ssmkit.serve.batching`: the engine thread that decodes concurrent requests together.
- :mod:`ssmkit.serve.sessions`: session states within a memory budget and a disk quota, persisted on disk;
  :mod:`ssmkit.serve.recovery`: reading them back at startup (quarantine, never deletion, of what is unreadable).
- :mod:`ssmkit.serve.app`: the routes; :mod:`ssmkit.serve.schemas`: request bodies (every field bounded).
- :mod:`ssmkit.serve.guard`: Host/Origin allow-list, token, requests under way, body size and read time;
  :mod:`ssmkit.serve.connections`: header timeout and a bound on idle connections (slowloris).
- :mod:`ssmkit.serve.text`: token ids to text, stop strings, at a bounded cost per token.
- :mod:`ssmkit.serve.prefix_cache`: snapshots of prompt-prefix states, reused at any token
  (:mod:`ssmkit.serve.prefix_disk`: their disk tier); :mod:`ssmkit.serve.metrics`: ``GET /metrics``.
- :mod:`ssmkit.serve.chat`: ``/v1/chat/completions`` with the checkpoint's chat template (sandboxed Jinja2).
"""

from ssmkit.serve.options import ServeOptions

__all__ = ["ServeOptions"]
