"""``ssmkit bench snapshots``: read a long document once, answer many queries from copies of its state.

An SSM's cache after a document is a fixed-size value (:class:`ssmkit.models.ModelCache`): save it,
clone it, and each query continues from the document without reading it again. This benchmark
compares, for ``--queries`` questions about one document of ``--doc-bytes`` bytes:

- re-reading: for every query, a fresh cache reads the document, then the query is answered;
- snapshot: the document is read once, its cache saved to a safetensors file (bytes reported), and
  every query is answered from ``cache.clone()`` (one query also from the file, loaded back).

Both read the document with the same chunks, so the answers (greedy, ``--answer-tokens`` each) must
be identical token for token, and the states bit for bit; the result says whether they are. The
document is Python standard-library source (bytes); the model is a trained checkpoint
(``--checkpoint``, e.g. a ``ssmkit eval byte-lm`` run's ``runs/mamba2/model``) or, by default, a
freshly initialised byte-level Mamba-2 (``byte-small``): the timing and the identity do not depend on
the weights. For comparison the table gives the KV cache a transformer of the same width and depth
would hold after the same document.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ssmkit.data import ByteTokenizer, read_documents
from ssmkit.evals._common import add_options, resolve_device
from ssmkit.evals._common import settings as experiment_settings
from ssmkit.evals._report import (
    format_table,
    pyplot,
    save_figure,
    synchronize,
    timed,
    write_result,
)
from ssmkit.evals.registry import register
from ssmkit.models import ModelCache
from ssmkit.models import LanguageModel, get_preset
from ssmkit.models.config import AttentionConfig, ModelConfig

QUERY_TEMPLATE = "\n\n# Question {i}: which function above does the most work, and why?\n# Answer:"


def read_document(model: LanguageModel, ids: torch.Tensor, chunk: int) -> ModelCache:
    """A new cache of ``model`` that has read ``ids`` (1, l), ``chunk`` positions at a time."""
    cache = model.allocate_cache(1)
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk):
            model(ids[:, start:start + chunk], cache=cache, logits_to_keep=1)
    return cache


def answer(model: LanguageModel, query: list[int], cache: ModelCache, tokens: int) -> list[int]:
    """Greedy continuation of ``query`` from ``cache`` (consumed)."""
    return model.generate([query], tokens, temperature=0, cache=cache)[0]


def document_bytes(n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the standard library's .py files, concatenated in path order."""
    out, size = [], 0
    for doc in read_documents([], []):
        out.append(doc.data)
        size += len(doc.data)
        if size >= n_bytes:
            break
    return b"".join(out)[:n_bytes]


FULL = {"doc_bytes": 1_000_000, "queries": 8, "answer_tokens": 64, "chunk": 8192, "seed": 0}
SMOKE = {**FULL, "doc_bytes": 4096, "queries": 3, "answer_tokens": 8, "chunk": 1024}
HELP = {
    "doc_bytes": "document length in bytes (standard-library source)",
    "queries": "questions about the document",
    "answer_tokens": "greedy tokens per answer",
    "chunk": "positions read per forward call",
    "seed": "seed of the fresh weights",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FULL, SMOKE, HELP)
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="ssmkit model folder of a byte-level model (default: byte-small freshly initialised; "
                             "with --smoke a 2-layer, d_model 64 version)")


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Time both ways, check they agree, print the table, write ``result.json`` and ``snapshots.png``."""
    settings = {**experiment_settings(args, FULL, SMOKE), "checkpoint": args.checkpoint,
                "revision": getattr(args, "revision", None)}
    for name in ("doc_bytes", "queries", "answer_tokens", "chunk"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    device = resolve_device(args.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _model(settings, args.smoke, device)
    tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is not a byte vocabulary "
                         f"({tokenizer.vocab_size} tokens): this benchmark needs a byte-level model")
    if any(spec.mixer == "attention" for spec in model.config.layer_specs()):
        print("note: the model has full-attention layers; their part of the state grows with the document")
    text = document_bytes(settings["doc_bytes"])
    doc = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(text)]], device=device)
    queries = [tokenizer.encode(QUERY_TEMPLATE.format(i=i + 1)) for i in range(settings["queries"])]
    chunk, n_answer = settings["chunk"], settings["answer_tokens"]
    # Warm-up on a short prefix: the first calls pay one-off costs (kernel compilation, allocator growth).
    answer(model, queries[0], read_document(model, doc[:, :min(chunk, doc.shape[1])], chunk), 2)

    reread_read, reread_answer, reread_out, first_state = [], [], [], None
    for q in queries:
        t_read, cache = timed(lambda: read_document(model, doc, chunk), device)
        if first_state is None:
            first_state = cache.clone()
        t_answer, tokens = timed(partial(answer, model, q, cache, n_answer), device)
        reread_read.append(t_read)
        reread_answer.append(t_answer)
        reread_out.append(tokens)

    t_read, snapshot = timed(lambda: read_document(model, doc, chunk), device)
    path = out / "document_state.safetensors"
    t_save, _ = timed(lambda: snapshot.save(path), device)
    snap_clone, snap_answer, snap_out = [], [], []
    for q in queries:
        t_clone, fork = timed(snapshot.clone, device)
        t_answer, tokens = timed(partial(answer, model, q, fork, n_answer), device)
        snap_clone.append(t_clone)
        snap_answer.append(t_answer)
        snap_out.append(tokens)
    t_load, loaded = timed(lambda: ModelCache.load(path, device=device), device)
    from_file = answer(model, queries[0], loaded, n_answer)
    synchronize(device)

    same_answers = reread_out == snap_out and from_file == snap_out[0]
    same_state = _equal(first_state, snapshot) and _equal(ModelCache.load(path, device=device), snapshot)
    reread_total = sum(reread_read) + sum(reread_answer)
    snapshot_total = t_read + t_save + sum(snap_clone) + sum(snap_answer)
    transformer_kv = _transformer_cache_bytes(model.config, doc.shape[1])
    figures = {
        "document_bytes": len(text), "document_tokens": int(doc.shape[1]), "queries": len(queries),
        "answer_tokens": n_answer, "state_bytes": snapshot.nbytes, "state_file_bytes": path.stat().st_size,
        "transformer_kv_cache_bytes": transformer_kv,
        "reread_read_s": reread_read, "reread_answer_s": reread_answer, "reread_total_s": reread_total,
        "snapshot_read_s": t_read, "snapshot_save_s": t_save, "snapshot_load_s": t_load,
        "snapshot_clone_s": snap_clone, "snapshot_answer_s": snap_answer, "snapshot_total_s": snapshot_total,
        "time_saved_s": reread_total - snapshot_total, "speedup": reread_total / snapshot_total,
        "identical_answers": same_answers, "identical_states": same_state,
    }
    mean = lambda xs: sum(xs) / len(xs)
    table = format_table(
        ["way", "document reads", "read s (each)", "clone/save s", "answer s (mean)",
         f"total s ({len(queries)} queries)"],
        [["re-read per query", len(queries), mean(reread_read), None, mean(reread_answer), reread_total],
         ["snapshot + clones", 1, t_read, t_save + sum(snap_clone), mean(snap_answer), snapshot_total]])
    sizes = format_table(
        ["document bytes", "state bytes (in memory)", "state file bytes", "transformer KV cache bytes",
         "speedup", "identical answers", "identical states"],
        [[len(text), snapshot.nbytes, path.stat().st_size, transformer_kv, figures["speedup"], same_answers,
          same_state]])
    print(f"{table}\n\n{sizes}")
    plot = _plot(figures, out / "snapshots.png", device)
    result = {"bench": "snapshots", "smoke": bool(args.smoke), "device": str(device), "settings": settings,
              "model": model.config.to_dict(), "figures": figures, "table": table, "sizes": sizes,
              "answers": [tokenizer.decode(t) for t in snap_out], "plots": [plot.name]}
    write_result(out, result)
    return result


def _model(settings: dict[str, Any], smoke: bool, device: torch.device) -> LanguageModel:
    if settings["checkpoint"]:
        return LanguageModel.from_pretrained(settings["checkpoint"], device=device,
                                             revision=settings.get("revision")).eval()
    torch.manual_seed(settings["seed"])
    config = get_preset("byte-small")
    if smoke:
        config.d_model, config.n_layer = 64, 2
    return LanguageModel(config, device=device).eval()


def _equal(a: ModelCache, b: ModelCache) -> bool:
    return a.seqlen_offset == b.seqlen_offset and all(
        torch.equal(x, y) for sa, sb in zip(a.states, b.states) for x, y in zip(sa.tensors().values(),
                                                                                sb.tensors().values()))


def _transformer_cache_bytes(config: ModelConfig, tokens: int) -> int:
    """KV cache bytes after ``tokens`` of a full-attention model with ``config``'s width and depth."""
    heads = max(1, config.d_model // 64)
    attention = ModelConfig(vocab_size=config.vocab_size, d_model=config.d_model, n_layer=config.n_layer,
                            layer_pattern="A", attention=AttentionConfig(num_heads=heads))
    return LanguageModel(attention, device=torch.device("meta")).cache_nbytes(tokens)


def _plot(f: dict[str, Any], path: Path, device: torch.device) -> Path:
    plt = pyplot()
    n = f["queries"]
    reread = [sum(f["reread_read_s"][:k]) + sum(f["reread_answer_s"][:k]) for k in range(n + 1)]
    once = f["snapshot_read_s"] + f["snapshot_save_s"]
    snap = [once + sum(f["snapshot_clone_s"][:k]) + sum(f["snapshot_answer_s"][:k]) for k in range(n + 1)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(range(n + 1), reread, marker="o", label="re-read the document for each query")
    ax.plot(range(n + 1), snap, marker="o", label="read once, save, answer from clones")
    ax.set(xlabel="queries answered", ylabel="cumulative seconds",
           title=f"{f['document_bytes']:,}-byte document, state {f['state_bytes']:,} bytes ({device.type})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


ENTRY = register("bench", "snapshots", "read a document once, answer queries from clones of its saved state",
                 add_arguments, run)
