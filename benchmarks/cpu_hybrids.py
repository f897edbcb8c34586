"""transformers' SSM hybrids on this CPU: transformers' model vs ssmkit's LanguageModel loaded from the folder
transformers saved, so both run the same random weights, side by side in one process.

For each model type: a forward at ``--length`` tokens (batch 1, no grad, no cache; best of ``--repeats``) and
``--decode`` greedy tokens after a 16-token prompt (transformers' ``generate`` with its cache, ssmkit's
``generate``), printed with the ratio (transformers' time / ssmkit's: > 1 means ssmkit is faster), the logits'
relative difference and whether the greedy tokens agree. Each model type's shapes and builder live in a
function of its own (``granite_case`` ...), listed in ``CASES``.

    python benchmarks/cpu_hybrids.py                          # every model type, L = 2048, 32 decode steps
    python benchmarks/cpu_hybrids.py --model granite --decode 64
    python benchmarks/cpu_hybrids.py --tiny                   # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def compare(name: str, hf: torch.nn.Module, args: argparse.Namespace) -> None:
    """Save ``hf`` (random weights, eval mode), load it with ssmkit, time and compare both; print the rows."""
    import transformers

    from ssmkit.models import LanguageModel
    from ssmkit.testing import relative_error

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(Path(folder))
        ours = LanguageModel.from_pretrained(folder).eval()
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(1))
    ref = hf(ids, use_cache=False).logits
    err = relative_error(ours(ids).logits[..., :vocab], ref)
    hf_s = _best(lambda: hf(ids, use_cache=False), args.repeats)
    our_s = _best(lambda: ours(ids), args.repeats)
    params = sum(p.numel() for p in ours.parameters())
    print(f"{name}{' (tiny)' if args.tiny else ''}: {params / 1e6:.1f}M parameters, L {args.length}, batch 1, fp32, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"  forward: transformers {hf_s:.3f} s | ssmkit {our_s:.3f} s | ratio {hf_s / our_s:.2f}x | "
          f"logits rel. diff {err:.2e}")
    if args.decode:
        prompt, n = ids[:, :16], args.decode
        kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
        hf.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        ours.generate(prompt, 2, temperature=0)
        hf_tokens = hf.generate(prompt, **kwargs)[0, 16:].tolist()
        our_tokens = ours.generate(prompt, n, temperature=0)[0, 16:].tolist()
        hf_tps = n / _best(lambda: hf.generate(prompt, **kwargs), args.repeats)
        our_tps = n / _best(lambda: ours.generate(prompt, n, temperature=0), args.repeats)
        print(f"  decode ({n} tokens): transformers {hf_tps:.1f} tok/s | ssmkit {our_tps:.1f} tok/s | "
              f"ratio {our_tps / hf_tps:.2f}x | greedy tokens agree {hf_tokens == our_tokens}")


def granite_case(tiny: bool) -> torch.nn.Module:
    """granitemoehybrid: Granite-4.0-H-Tiny's layout at a CPU-sized width — 10 layers (attention at 5, no
    positional encoding), d_model 768, 12 query / 4 KV heads, Mamba-2 with 24 heads of 64, d_state 128,
    64 experts of 256 (top 6) plus a shared MLP of 512, Granite's multipliers, vocab 32000."""
    import transformers

    shape = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=10, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=256, shared_intermediate_size=512, num_local_experts=64,
                 num_experts_per_tok=6, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128, mamba_chunk_size=256)
    if tiny:
        shape = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8,
                     num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=32)
    layers = shape["num_hidden_layers"]
    config = transformers.GraniteMoeHybridConfig(
        **shape, layer_types=["attention" if i == layers // 2 else "mamba" for i in range(layers)],
        position_embedding_type="nope", embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.0078125, logits_scaling=6.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.GraniteMoeHybridForCausalLM(config).eval()


CASES: dict[str, Callable[[bool], torch.nn.Module]] = {"granite": granite_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("all", *CASES), default="all")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode", type=int, default=32, help="greedy decode steps to time (0: none)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (smoke run)")
    args = parser.parse_args()
    for name, case in CASES.items():
        if args.model in ("all", name):
            compare(name, case(args.tiny), args)


if __name__ == "__main__":
    main()
