"""transformers' own Mamba / Mamba-2 models on this CPU (or a GPU, ``--device cuda``): their PyTorch fallback
vs ssmkit's kernels routed in by ``ssmkit.compat.install()``, side by side in one process, the same random
weights in both.

The fallback model is built first (transformers' modeling module imported before ``install()``, so it
keeps the torch paths); then ``install()`` runs, the modeling module is imported afresh (its decorators
now find ``mamba_ssm`` / ``causal_conv1d`` = ssmkit.compat) and the same state dict is loaded. Each
forward (no grad, no cache) is timed ``--repeats`` times, best kept; logits are compared; the ratio is
printed. ``--decode N`` also times N greedy decode steps after a short prompt.

    python benchmarks/cpu_transformers_compat.py                        # mamba-130m, L = 2048
    python benchmarks/cpu_transformers_compat.py --model mamba2 --length 2048 --decode 32
    python benchmarks/cpu_transformers_compat.py --tiny                 # a seconds-long smoke run
    python benchmarks/cpu_transformers_compat.py --device cuda --dtype bfloat16 --decode 64   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

SIZES = {
    # HF mamba-130m / mamba2-130m shapes (random weights).
    "mamba": {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "expand": 2,
                  "conv_kernel": 4},
    "mamba2": {"vocab_size": 50288, "hidden_size": 768, "num_hidden_layers": 24, "state_size": 128, "expand": 2,
                   "head_dim": 64, "num_heads": 24, "n_groups": 1, "conv_kernel": 4, "chunk_size": 256},
}
TINY = {
    "mamba": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 8, "expand": 2, "conv_kernel": 4},
    "mamba2": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "expand": 2, "head_dim": 16,
                   "num_heads": 8, "n_groups": 2, "conv_kernel": 4, "chunk_size": 32},
}


def _model_class(kind: str):
    """(config class, model class), the latter from the modeling module as imported now (not transformers'
    top-level attribute, which keeps the class of the first import)."""
    import importlib

    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    name = "Mamba" if kind == "mamba" else "Mamba2"
    return getattr(modeling, f"{name}Config"), getattr(modeling, f"{name}ForCausalLM")


# perf_counter (wall clock) by default; --clock cpu takes the process's CPU time, which other jobs on a
# shared machine inflate far less (with one thread it is the wall time of a quiet machine, page faults
# included; with several it sums them, so it does not show parallel speed-up).
CLOCK = time.perf_counter


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = CLOCK()
        fn()
        _sync()
        times.append(CLOCK() - start)
    return min(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run(model, ids: torch.Tensor, repeats: int, decode: int) -> tuple[torch.Tensor, float, float | None]:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        seconds = _best(lambda: model(ids, use_cache=False), repeats)
        tokens_per_s = None
        if decode:
            prompt = ids[:, :16]
            kwargs = {"max_new_tokens": decode, "min_new_tokens": decode, "do_sample": False, "pad_token_id": 0}
            model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            tokens_per_s = decode / _best(lambda: model.generate(prompt, **kwargs), repeats)
    return logits, seconds, tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(SIZES), default="mamba")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode", type=int, default=0, help="also time this many greedy decode steps")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import transformers

    torch.manual_seed(0)
    config_cls, model_cls = _model_class(args.model)
    config = config_cls(**(TINY if args.tiny else SIZES)[args.model])
    ids = torch.randint(0, config.vocab_size, (1, args.length), device=args.device)
    fallback = model_cls(config).eval().to(args.device, dtype)
    state = fallback.state_dict()
    base_logits, base_s, base_tps = _run(fallback, ids, args.repeats, args.decode)
    del fallback

    import ssmkit.compat

    # The modeling module bound its torch fallbacks when it was imported: import it again after install().
    for name in [n for n in sys.modules if n.startswith(f"transformers.models.{args.model}.")]:
        del sys.modules[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ssmkit.compat.install()
    _, model_cls = _model_class(args.model)
    routed = model_cls(config).eval().to(args.device, dtype)
    routed.load_state_dict(state)
    logits, ours_s, ours_tps = _run(routed, ids, args.repeats, args.decode)

    err = ((logits - base_logits).float().abs().max() / base_logits.float().abs().max()).item()
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
                  f"{args.clock} clock, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.model}{' (tiny)' if args.tiny else ''}, L {args.length}, batch 1, {args.dtype}, {where}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"forward: transformers fallback {base_s:.3f} s | with ssmkit.compat.install() {ours_s:.3f} s | "
          f"ratio {base_s / ours_s:.2f}x | logits max rel. diff {err:.2e}")
    if args.decode:
        print(f"decode ({args.decode} tokens): fallback {base_tps:.1f} tok/s | with install() {ours_tps:.1f} tok/s | "
              f"ratio {ours_tps / base_tps:.2f}x")


if __name__ == "__main__":
    main()
