"""Training throughput: ssmkit vs a Hugging Face transformers model of the same shape, in the same loop.

One training loop (AdamW with the no-decay groups, gradient clipping, fp32 on CPU / bf16 autocast on
GPU) runs over the same packed rows of the default corpus (the standard library's source) for both
models. The transformers model is built from the preset by ssmkit's converter and its weights loaded into
ssmkit, so both start from the same parameters. ssmkit is timed twice: with ``seq_idx`` (how ``ssmkit
train`` runs, state restarting at every document) and without it (what transformers computes: its torch
path has no document resets). Tokens/s counts input tokens, best of ``--repeats`` windows of ``--steps``
steps after ``--warmup`` steps.

    python benchmarks/train_cpu.py                                  # byte-small, 8 x 256, this CPU
    python benchmarks/train_cpu.py --quick                          # a smoke run
    python benchmarks/train_cpu.py --preset mamba2-130m --device cuda --seq-lens 2048 8192 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmkit.data import IGNORE, BatchLoader, DataConfig, load_datasets
from ssmkit.models.formats.transformers_config import config_to_transformers
from ssmkit.models import LanguageModel, get_preset, param_groups


def build_pair(preset: str, vocab_size: int, folder: Path, device: torch.device):
    """A random transformers model of the preset's shape and the same weights in ssmkit."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = get_preset(preset)
    config.vocab_size = max(config.vocab_size, vocab_size)
    raw = config_to_transformers(config, config.padded_vocab_size)
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **raw))
    hf.save_pretrained(folder)
    return hf.to(device), LanguageModel.from_pretrained(folder).to(device)


def train_rate(forward, model: torch.nn.Module, loader: BatchLoader, device: torch.device, autocast,
               warmup: int, steps: int, repeats: int) -> float:
    """Best tokens/s over ``repeats`` windows of ``steps`` training steps (after ``warmup`` steps)."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))

    def step() -> int:
        (batch,) = loader.next()
        batch = batch.to(device)
        with autocast:
            logits = forward(batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.n_tokens

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    best = 0.0
    for _ in range(repeats):
        sync()
        start, tokens = time.perf_counter(), 0
        for _ in range(steps):
            tokens += step()
        sync()
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def _fmt(rate: float | None) -> str:
    return "OOM" if rate is None else f"{rate:,.0f}"


def _ratio(rate: float | None, base: float | None) -> str:
    return "-" if rate is None or base is None else f"{rate / base:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="byte-small")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many windows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 128, 1 warm-up step, 2 timed steps")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.batch_size, args.warmup, args.steps, args.repeats = [128], 2, 1, 2, 1
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    precision = "bf16 autocast" if bf16 else "fp32"

    load_start = os.getloadavg()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {where}; "
          f"{precision}; load average {load_start[0]:.2f} at start")
    header = (f"{'preset':<13}{'batch x len':>12}{'transformers':>14}{'ssmkit':>10}{'ratio':>8}"
              f"{'ssmkit+seq_idx':>16}{'ratio':>8}")
    print(f"training tokens/s (higher is better)\n{header}\n{'-' * len(header)}", flush=True)
    rows = []
    for seq_len in args.seq_lens:
        data = load_datasets(DataConfig(seq_len=seq_len), batch_size=args.batch_size, eval_tokens=1)
        with tempfile.TemporaryDirectory() as tmp:
            hf, model = build_pair(args.preset, data.tokenizer.vocab_size, Path(tmp), device)
        hf.train()
        model.train()

        def loader() -> BatchLoader:
            return BatchLoader(data.train, args.batch_size, seed=0)

        def rate(forward, module: torch.nn.Module) -> float | None:
            try:
                return train_rate(forward, module, loader(), device, autocast, args.warmup, args.steps, args.repeats)
            except torch.OutOfMemoryError:
                return None

        rate_hf = rate(lambda b: hf(b.input_ids, use_cache=False).logits, hf)
        hf.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rate_ss = rate(lambda b: model(b.input_ids).logits, model)
        rate_pk = rate(lambda b: model(b.input_ids, seq_idx=b.seq_idx).logits, model)
        rows.append(dict(preset=args.preset, batch_size=args.batch_size, seq_len=seq_len, device=str(device),
                         precision=precision, transformers_tok_s=rate_hf, ssmkit_tok_s=rate_ss,
                         ssmkit_seq_idx_tok_s=rate_pk))
        print(f"{args.preset:<13}{f'{args.batch_size} x {seq_len}':>12}{_fmt(rate_hf):>14}{_fmt(rate_ss):>10}"
              f"{_ratio(rate_ss, rate_hf):>8}{_fmt(rate_pk):>16}{_ratio(rate_pk, rate_hf):>8}", flush=True)
        del hf, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} at the end (1-minute)")
    if args.json:
        info = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), device=where,
                    load_average_start=load_start[0], load_average_end=load_end[0])
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
