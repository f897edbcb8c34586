"""CPU benchmark of whole language models: ssmkit vs Hugging Face transformers, same weights.

For each model shape (ssmkit presets ``mamba-130m`` and ``mamba2-130m``; the transformers config is
written from the preset by ssmkit's converter, so the shapes are equal) a random transformers model is
built, saved with ``save_pretrained`` and loaded into ssmkit with ``LanguageModel.from_pretrained``: both
sides then hold the same weights. Measured in fp32, batch 1, no gradients:

- forward: logits for L tokens (default L = 2048), best of ``--repeats`` after a warm-up call;
- decode: tokens/s of 64 greedy single-token steps after a 512-token prompt (the prompt is prefilled
  once; each repeat restarts from a copy of the prefilled cache), best of ``--repeats``; also for ssmkit
  with bf16 weights (``ssmkit generate --dtype bfloat16``; states float32), a row of its own whose "logits
  rel err" is that of its last prompt position's logits against the fp32 model's (greedy tokens of random
  weights sit on near-ties, so they part after a few steps and say little).

The two libraries' runs alternate within each repeat, so on a shared machine both see about the same
load; the load average is printed at the start and the end.

The table also gives the relative error between the two libraries' logits (same weights, so it shows
both compute the same function) and whether the greedy tokens agree. transformers runs its torch
fallbacks (no mamba_ssm / causal_conv1d kernels on CPU); its warnings about that are expected.

    python benchmarks/models_cpu.py                       # both models, L = 2048
    python benchmarks/models_cpu.py --quick               # L = 256, 64-token prompt, 8 new tokens, one repeat
    python benchmarks/models_cpu.py --models mamba-130m --lengths 512 2048 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ssmkit.models.formats.transformers_config import config_to_transformers
from ssmkit.models import LanguageModel, get_preset
from ssmkit.testing import relative_error


def best_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds (after one untimed warm-up round).

    The functions alternate within each round, so on a shared machine each sees about the same load.
    """
    if warmup:
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def build_pair(preset: str, folder: Path) -> tuple[torch.nn.Module, LanguageModel, LanguageModel]:
    """A random transformers model of the preset's shape and the same weights loaded into ssmkit, in
    float32 and with bf16 weights."""
    import transformers

    config = get_preset(preset)
    raw = config_to_transformers(config, config.padded_vocab_size)
    model_type = raw.pop("model_type")
    raw.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    hf.save_pretrained(folder)
    return (hf, LanguageModel.from_pretrained(folder).eval(),
            LanguageModel.from_pretrained(folder, dtype=torch.bfloat16).eval())


def hf_decoder(hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, tokens: list) -> Callable[[], None]:
    """A function running ``new_tokens`` greedy cached steps of a transformers model after ``prompt``
    (prefilled once, here; each call starts from a copy of that cache) and storing them in ``tokens``."""
    out = hf(prompt, use_cache=True)
    prefilled, first = out.cache_params, out.logits[:, -1:].argmax(-1)

    def run() -> None:
        cache, tok = copy.deepcopy(prefilled), first
        tokens.clear()
        for _ in range(new_tokens):
            tokens.append(tok)
            tok = hf(tok, cache_params=cache, use_cache=True).logits[:, -1:].argmax(-1)

    return run


def ssmkit_decoder(model: LanguageModel, prompt: torch.Tensor, new_tokens: int, tokens: list) -> Callable[[], None]:
    """As :func:`hf_decoder` for an ssmkit model (cache from ``allocate_cache``, copied with ``clone``)."""
    prefilled = model.allocate_cache(prompt.shape[0])
    first = model(prompt, cache=prefilled, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def run() -> None:
        cache, tok = prefilled.clone(), first
        tokens.clear()
        for _ in range(new_tokens):
            tokens.append(tok)
            tok = model(tok, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m"], help="ssmkit preset names")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048], help="forward lengths")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length before decoding")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after the prompt")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: L = 256, 64-token prompt, 8 new tokens, 1 repeat")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.prompt, args.new_tokens, args.repeats = [256], 64, 8, 1

    load_start = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; load average {load_start[0]:.2f} at start")
    header = (f"{'model':<13}{'measure':<22}{'transformers':>13}{'ssmkit':>10}{'speed-up':>10}"
              f"{'logits rel err':>16}{'same tokens':>13}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    torch.set_grad_enabled(False)
    for preset in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            hf, model, model_bf16 = build_pair(preset, Path(tmp))
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        for length in args.lengths:
            ids = torch.randint(0, vocab, (1, length), generator=g)
            outputs = {}
            times = best_times({
                "hf": lambda: outputs.__setitem__("hf", hf(ids, use_cache=False).logits),
                "ss": lambda: outputs.__setitem__("ss", model(ids).logits),
            }, args.repeats)
            t_hf, t_ss = times["hf"], times["ss"]
            err = relative_error(outputs["ss"], outputs["hf"])
            rows.append(dict(model=preset, measure="forward", length=length, transformers_s=t_hf, ssmkit_s=t_ss,
                             speedup=t_hf / t_ss, logits_rel_err=err))
            print(f"{preset:<13}{f'forward L={length} (s)':<22}{t_hf:>13.3f}{t_ss:>10.3f}{t_hf / t_ss:>9.1f}x"
                  f"{err:>16.1e}{'':>13}", flush=True)

        prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
        tok_hf: list[torch.Tensor] = []
        tok_ss: list[torch.Tensor] = []
        times = best_times({
            "hf": hf_decoder(hf, prompt, args.new_tokens, tok_hf),
            "ss": ssmkit_decoder(model, prompt, args.new_tokens, tok_ss),
            "bf16": ssmkit_decoder(model_bf16, prompt, args.new_tokens, []),
        }, args.repeats, warmup=False)
        rate_hf, rate_ss = args.new_tokens / times["hf"], args.new_tokens / times["ss"]
        same = bool(torch.equal(torch.cat(tok_hf, dim=1), torch.cat(tok_ss, dim=1)))
        rows.append(dict(model=preset, measure="decode", prompt=args.prompt, new_tokens=args.new_tokens,
                         transformers_tok_s=rate_hf, ssmkit_tok_s=rate_ss, speedup=rate_ss / rate_hf,
                         same_tokens=same))
        print(f"{preset:<13}{'decode (tokens/s)':<22}{rate_hf:>13.1f}{rate_ss:>10.1f}{rate_ss / rate_hf:>9.1f}x"
              f"{'':>16}{'yes' if same else 'no':>13}", flush=True)
        rate_bf16 = args.new_tokens / times["bf16"]
        err = relative_error(model_bf16(prompt, logits_to_keep=1).logits.float(),
                             model(prompt, logits_to_keep=1).logits)
        rows.append(dict(model=preset, measure="decode bf16 weights", prompt=args.prompt, new_tokens=args.new_tokens,
                         transformers_tok_s=rate_hf, ssmkit_tok_s=rate_bf16, speedup=rate_bf16 / rate_hf,
                         logits_rel_err=err))
        print(f"{preset:<13}{'decode, bf16 (tok/s)':<22}{rate_hf:>13.1f}{rate_bf16:>10.1f}{rate_bf16 / rate_hf:>9.1f}x"
              f"{err:>16.1e}", flush=True)
        del hf, model, model_bf16

    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} at the end (1-minute)")
    if args.json:
        info = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                    load_average_start=load_start[0], load_average_end=load_end[0], repeats=args.repeats)
        with open(args.json, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
