"""``ssmkit serve``: an HTTP server with streaming completions, continuous batching and stateful sessions.

The web stack (FastAPI, uvicorn, sse-starlette; ``pip install 'ssmkit[serve]'``) is imported only by
:mod:`ssmkit.serve.app` and :func:`ssmkit.serve.server.serve`, so ``import ssmkit`` never needs it.

- :mod:`ssmkit.serve.batching`: the engine thread that decodes concurrent requests together.
- :mod:`ssmkit.serve.sessions`: session states within a memory budget, persisted on disk.
- :mod:`ssmkit.serve.app`: the routes; :mod:`ssmkit.serve.schemas`: request bodies.
"""

from ssmkit.serve.options import ServeOptions

__all__ = ["ServeOptions"]
