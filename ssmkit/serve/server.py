"""Start the server: session folder of this model, the ASGI app, uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.serve.options import ServeOptions
from ssmkit.serve.sessions import SessionStore, default_sessions_dir, model_fingerprint

if TYPE_CHECKING:
    from ssmkit.models.language_model import LanguageModel


def serve(model: LanguageModel, tokenizer: Tokenizer, folder: Path, options: ServeOptions) -> None:
    """Serve ``model`` (loaded from checkpoint ``folder``) until interrupted.

    Sessions persist in ``<sessions_dir>/<fingerprint of the checkpoint's files>``, so a restart with the
    same checkpoint finds them and states of another model are never mixed in.
    """
    import torch
    import uvicorn

    from ssmkit.serve.app import create_app
    from ssmkit.serve.chat_template import load_chat_template
    from ssmkit.serve.connections import IdleConnections, guarded_protocol

    log = logging.getLogger("ssmkit.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     ssmkit: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    sessions_dir = (options.sessions_dir or default_sessions_dir()) / model_fingerprint(folder)
    store = SessionStore(sessions_dir, model.eval(), memory_budget=options.session_memory_bytes,
                         max_sessions=options.max_sessions, disk_quota=options.session_disk_bytes)
    if options.token is None and not _is_loopback(options.host):
        log.warning("binding to %s without --token-file: anyone who can reach this address can use the model",
                    options.host)
    log.info("model %s from %s; sessions in %s (%d restored)", options.model_name, folder, sessions_dir, len(store))
    chat_template = load_chat_template(folder)
    app = create_app(model, tokenizer, store, options, chat_template)
    # No limit_concurrency: uvicorn would count connections that have not sent a header yet (slowloris);
    # idle connections are bounded by IdleConnections, requests under way by the app's RequestGuard.
    idle = IdleConnections(options.header_timeout_s, options.max_idle_connections)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info", http=guarded_protocol(idle),
                timeout_keep_alive=options.keep_alive_s, timeout_graceful_shutdown=5,
                h11_max_incomplete_event_size=options.max_header_bytes)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
