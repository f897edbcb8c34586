"""The server's settings and their command-line flags (no web-stack import, so the CLI stays light)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ssmkit.io.files import read_text

MIB = 1 << 20


@dataclasses.dataclass(kw_only=True)
class ServeOptions:
    """Limits and places of ``ssmkit serve``; every limit turns an over-sized request into a 4xx."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "ssmkit"
    token: str | None = None
    sessions_dir: Path | None = None
    session_memory_bytes: int = 1024 * MIB
    max_sessions: int = 100_000
    max_body_bytes: int = 4 * MIB
    max_prompt_tokens: int = 1 << 20
    max_tokens_cap: int = 4096
    request_timeout_s: float = 600.0
    max_batch: int = 64
    max_requests: int = 256
    prefill_chunk_size: int = 2048
    prefill_budget: int = 4096
    cuda_graph: bool | None = None
    threads: int | None = None
    session_disk_bytes: int = 10 * 1024 * MIB
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_idle_connections: int = 512
    max_header_bytes: int = 32 * 1024
    prefix_cache: bool = True
    prefix_cache_bytes: int = 1024 * MIB
    prefix_cache_disk_bytes: int = 0
    prefix_cache_interval: int = 512

    def __post_init__(self) -> None:
        for name in ("port", "session_memory_bytes", "max_sessions", "max_body_bytes", "max_prompt_tokens",
                     "max_tokens_cap", "max_batch", "max_requests", "prefill_chunk_size", "prefill_budget",
                     "session_disk_bytes",
                     "max_idle_connections", "max_header_bytes", "prefix_cache_bytes", "prefix_cache_disk_bytes",
                     "prefix_cache_interval"):
            value = getattr(self, name)
            if value < (0 if name in ("port", "session_memory_bytes", "prefix_cache_bytes",
                                      "prefix_cache_disk_bytes") else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if self.token is not None and not self.token:
            raise ValueError("the auth token is empty")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ssmkit serve`` flags."""
    d = ServeOptions()
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="model folder or training run folder")
    parser.add_argument("--host", default=d.host, help=f"address to bind (default {d.host}: this machine only)")
    parser.add_argument("--port", type=int, default=d.port, metavar="N", help=f"(default {d.port})")
    parser.add_argument("--token-file", metavar="FILE",
                        help="require 'Authorization: Bearer <token>' with the token in this file")
    parser.add_argument("--sessions-dir", metavar="DIR",
                        help="where session states persist (default $XDG_STATE_HOME/ssmkit/sessions)")
    parser.add_argument("--session-memory-mb", type=float, default=d.session_memory_bytes / MIB, metavar="MB",
                        help="session states kept in memory up to this size; the rest wait on disk")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions, metavar="N")
    parser.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MIB, metavar="MB",
                        help="largest request body")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, metavar="N",
                        help="longest prompt or appended text, in tokens")
    parser.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap, metavar="N",
                        help="largest max_tokens a request may ask for")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="SECONDS")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                        help="requests decoded together in one step")
    parser.add_argument("--max-requests", type=int, default=d.max_requests, metavar="N",
                        help="requests in flight before new ones get 503")
    parser.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk_size, metavar="TOKENS",
                        help="most prompt tokens one request reads in one forward (bounds prefill memory)")
    parser.add_argument("--prefill-budget", type=int, default=d.prefill_budget, metavar="TOKENS",
                        help="prompt tokens read between two decode steps, over all requests: lower keeps running "
                             "streams smoother while long prompts arrive, higher reads prompts faster")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on a GPU, decode eagerly instead of replaying CUDA graphs (one per batch size)")
    parser.add_argument("--session-disk-mb", type=float, default=d.session_disk_bytes / MIB, metavar="MB",
                        help="disk quota for saved session states; a change beyond it is refused (507)")
    parser.add_argument("--allowed-hosts", default="", metavar="H1,H2",
                        help="Host header names accepted besides the bound address and localhost ('*': any); "
                             "others get 400 (defence against DNS rebinding)")
    parser.add_argument("--allowed-origins", default="", metavar="O1,O2",
                        help="browser origins (scheme://host[:port]) accepted besides those of allowed hosts "
                             "('*': any); requests from other origins get 403")
    parser.add_argument("--header-timeout", type=float, default=d.header_timeout_s, metavar="SECONDS",
                        help="a connection must send its request headers within this time")
    parser.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="SECONDS",
                        help="a request must send its whole body within this time (408)")
    parser.add_argument("--max-idle-connections", type=int, default=d.max_idle_connections, metavar="N",
                        help="connections without a request under way; beyond it the oldest is closed")
    parser.add_argument("--prefix-cache-mb", type=float, default=d.prefix_cache_bytes / MIB, metavar="MB",
                        help="memory for snapshots of prompt-prefix states (least recently used evicted first)")
    parser.add_argument("--prefix-cache-disk-mb", type=float, default=d.prefix_cache_disk_bytes / MIB, metavar="MB",
                        help="disk for snapshots evicted from memory (0: memory only); they survive a restart")
    parser.add_argument("--prefix-cache-interval", type=int, default=d.prefix_cache_interval, metavar="TOKENS",
                        help="snapshot a prompt's state every this many tokens (and at its end)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="never reuse the state of a shared prompt prefix")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for the model (default: torch's); 1 is best on a machine shared with "
                             "other busy processes")


def options_from_args(args: argparse.Namespace, model_name: str) -> ServeOptions:
    """:class:`ServeOptions` from parsed ``ssmkit serve`` flags (reads the token file)."""
    token = None
    if args.token_file:
        try:  # size-checked before reading: a token file is a few bytes (ssmkit.io.files' "secret" limit)
            token = read_text(args.token_file, "secret").strip()
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot read --token-file {args.token_file}: {e}") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    return ServeOptions(
        host=args.host, port=args.port, model_name=model_name, token=token,
        sessions_dir=Path(args.sessions_dir) if args.sessions_dir else None,
        session_memory_bytes=int(args.session_memory_mb * MIB), max_sessions=args.max_sessions,
        max_body_bytes=int(args.max_body_mb * MIB), max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_cap=args.max_tokens_cap, request_timeout_s=args.request_timeout, max_batch=args.max_batch,
        max_requests=args.max_requests, prefill_chunk_size=args.prefill_chunk, prefill_budget=args.prefill_budget,
        cuda_graph=False if args.no_cuda_graph else None, threads=args.threads,
        session_disk_bytes=int(args.session_disk_mb * MIB), allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins), header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, max_idle_connections=args.max_idle_connections,
        prefix_cache=not args.no_prefix_cache, prefix_cache_bytes=int(args.prefix_cache_mb * MIB),
        prefix_cache_disk_bytes=int(args.prefix_cache_disk_mb * MIB), prefix_cache_interval=args.prefix_cache_interval,
    )


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
