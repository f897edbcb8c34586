"""CPU benchmark, ssmkit vs llama.cpp on the same weights: prefill and batch-1 decode, per weight type.

For each model shape (presets ``mamba-130m``, ``mamba2-130m``) random weights are saved as a transformers
folder; llama.cpp's own converter (``convert_hf_to_gguf.py``) and ssmkit's (:mod:`ssmkit.models.formats.gguf`)
each write it as F32, BF16 and Q8_0 GGUF files. The script checks that

- both converters wrote the same tensors (names, types, shapes, bytes);
- llama.cpp (``llama-simple``, greedy) continuing a prompt from ssmkit's file gives the same tokens as
  ssmkit's greedy decoding of the same weights (the prompt tokenised with the GGUF's own vocabulary);

then times, ssmkit and llama.cpp alternating test by test within each round (median of ``--rounds``), at
each thread count: prefill of L tokens (ssmkit: one forward with logits for the last position; llama.cpp:
``llama-bench -p L -n 0``) and decode at batch 1 (ssmkit: greedy single-token steps from a cache;
``llama-bench -p 0 -n N``), tokens/s. ssmkit's weights are float32 / bfloat16 / weight-only int8
(``LanguageModel.quantize``) beside llama.cpp's F32 / BF16 / Q8_0. ssmkit's decode runs through the lean
step that ``generate`` takes on CPU (:mod:`ssmkit.generation.lean`) and, for comparison, through the
blocks' own step (``forward_one_layers``).

The machine may be shared: each figure is taken with the 1-minute load average beside it. ssmkit is
timed in wall time and in this process's CPU time; llama-bench reports wall time only, so the script
reads llama-bench's CPU time from getrusage and divides its tokens/s by the CPU share the process got
(CPU time / (wall time x threads), over the whole run including loading: an estimate). Decode is
also set against the bytes it reads: weight GB/s (by CPU time) as a share of a streaming read, and the
CPU time per token outside the matmuls (the step with its matmuls replaced by precomputed outputs).

llama.cpp is built from the source that the ``llama-cpp-python`` source distribution vendors (CPU only, the
instruction sets /proc/cpuinfo lists but AMX, see ``isa_options``; about 15 minutes on 2 free cores) when
``--build`` is given; never in CI:

    python benchmarks/cpu_llamacpp.py --build                       # fetch the sdist into .ext/, build
    python benchmarks/cpu_llamacpp.py                               # both models, all types, 1 and 2 threads
    python benchmarks/cpu_llamacpp.py --quick                       # mamba-130m, F32 and Q8_0, 1 thread, L 512
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from llamacpp_tools import build, convert_both, find_llama_cpp, greedy_agrees, tool
from torch import nn

from ssmkit.generation.decode import forward_one_layers
from ssmkit.generation.lean import lean_decoder
from ssmkit.layers.quantized import Int8Linear
from ssmkit.models import LanguageModel, get_preset
from ssmkit.ops.gemv import native_linear

# ssmkit weights beside llama.cpp's file type of the same bytes per weight.
TYPES = {"f32": "fp32", "bf16": "bf16", "q8_0": "int8"}


def make_weights(preset: str, folder: Path) -> LanguageModel:
    """Random weights of ``preset`` (fixed seed), saved as a transformers folder for llama.cpp's converter.

    out_proj's weights are scaled by 16: at the presets' initialisation the residual stream stays close to
    the input embedding, which the tied head scores highest, so greedy decoding of Mamba-1 repeats the last
    token and the token check would compare nothing; scaled, the mixers choose varied tokens."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset)).eval()
    with torch.no_grad():
        for block in model.layers:
            block.mixer.out_proj.weight.mul_(16)
    model.save_pretrained(folder, format="transformers")
    return model


def ssmkit_prefill(model: LanguageModel, length: int) -> tuple[float, float]:
    """Prefill of ``length`` tokens at batch 1 (one forward, logits of the last position): (tokens/s by wall
    time, tokens/s by this process's CPU time)."""
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        model(ids, logits_to_keep=1)
        return length / (time.perf_counter() - wall), length / (time.process_time() - cpu)


def ssmkit_decode(model: LanguageModel, decode_tokens: int, layers: bool = False) -> tuple[float, float]:
    """Greedy decode at batch 1 (``decode_tokens`` one-token steps from a cache, argmax included) through
    the lean step that ``generate`` takes on CPU, or with ``layers`` through the blocks' own step:
    (tokens/s by wall time, tokens/s by this process's CPU time)."""
    cache = model.allocate_cache(1)
    with torch.no_grad():
        lean = lean_decoder(model, cache)  # once per generation, as generate() gets it
        assert lean is not None, "the lean decode step does not apply to this model"
        step = (lambda t: forward_one_layers(model, t, cache)) if layers else (lambda t: lean(t, cache))
        token = step(torch.tensor([1])).argmax(-1)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(decode_tokens):
            token = step(token).argmax(-1)
        return decode_tokens / (time.perf_counter() - wall), decode_tokens / (time.process_time() - cpu)


def decode_overhead_ms(model: LanguageModel, tokens: int = 32) -> float:
    """CPU ms per lean decode step spent outside the matmuls (norms, convolution, state update, casts,
    Python and dispatch; argmax included): the step's CPU time less that of the same matmuls run alone, the
    same kernels over the same weights in the same order (every block's projections, dt_proj included, then
    the head), the two taking turns token by token so that a drift in the machine's bandwidth hits both.
    What bounds decode besides the weights' bytes. The one-call block steps (Mamba-1's and Mamba-2's) have
    their matmuls inside, so the matmuls cannot be swapped out of the step: they are timed beside it."""
    cache = model.allocate_cache(1)
    with torch.no_grad():
        lean = lean_decoder(model, cache)
        matrices = [getattr(block.mixer, name, None) for block in model.layers
                    for name in ("in_proj", "x_proj", "dt_proj", "out_proj")]
        head = model.lm_head if model.lm_head is not None else nn.Linear(1, 1, bias=False, device="meta")
        if model.lm_head is None:
            head.weight = nn.Parameter(model.head_weight.detach(), requires_grad=False)
        products = [_native_product(m) for m in (*matrices, head) if m is not None]
        token, step, alone = lean(torch.tensor([1]), cache).argmax(-1), 0.0, 0.0
        for _ in range(tokens):
            cpu = time.process_time()
            token = lean(token, cache).argmax(-1)
            step += time.process_time() - cpu
            cpu = time.process_time()
            for linear, x in products:
                linear(x)
            alone += time.process_time() - cpu
        return 1e3 * (step - alone) / tokens


def _native_product(module: nn.Module) -> tuple:
    """(x -> module's product through the native GEMV on float32 x, an input x): the kernels the lean step
    runs, without the casts around them. dt_proj (I x R, R ~ 48) is timed as its transpose, the same bytes
    in rows long enough to stream: Mamba-1's native step reads it 16 channels at a time, not row by row."""
    if isinstance(module, Int8Linear):
        weight, scales = module.qweight, module.scales
    else:
        weight, scales = module.weight.detach(), None
        if weight.shape[1] < 64:
            weight = weight.t().contiguous()
    return native_linear(weight, scales), torch.randn(1, weight.shape[1])


def llama_times(src: Path, gguf_file: Path, prompt: int, decode: int, threads: int) -> tuple[float, float]:
    """One llama-bench test (``-p prompt -n 0`` or ``-p 0 -n decode``: a warm-up run, one timed run): (its
    tokens/s, which llama-bench measures in wall time; the CPU share the process got over its whole run,
    CPU time of its threads / (wall time x threads) from getrusage, below 1 where the load took cores)."""
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run([str(tool(src, "llama-bench")), "-m", str(gguf_file), "-p", str(prompt), "-n", str(decode),
                          "-t", str(threads), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=1800).stdout
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = next(r for r in json.loads(out) if r["n_prompt"] == prompt and r["n_gen"] == decode)
    return row["avg_ts"], cpu / (wall * threads)


def read_bandwidth(threads: int, nbytes: int = 512 << 20) -> float:
    """GB/s of a streaming read (``sum`` of a float32 buffer far beyond the caches), best of 3."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    buffer = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(before)
    return nbytes / best / 1e9


def weight_bytes_per_token(model: LanguageModel) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer but an embedding that is not
    also the head (its one row is negligible); the states (read and written) come on top."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if model.lm_head is not None:
        total -= model.embedding.weight.numel() * model.embedding.weight.element_size()
    return total


def ssmkit_variant(model: LanguageModel, kind: str) -> LanguageModel:
    if kind == "fp32":
        return model
    if kind == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    return copy.deepcopy(model).quantize("int8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="fetch the llama-cpp-python sdist and build llama.cpp")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m"])
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="mamba-130m, f32 and q8_0, 1 thread, L 512, 1 round")
    parser.add_argument("--ssmkit-only", action="store_true",
                        help="no llama.cpp: ssmkit's fp32 / bf16 / int8 side by side (before a build exists)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.models, args.types, args.threads, args.lengths, args.rounds = ["mamba-130m"], ["f32", "q8_0"], [1], [512], 1
    if args.ssmkit_only:
        return ssmkit_only(args)
    src = build(args.jobs) if args.build else find_llama_cpp()
    if src is None:
        raise SystemExit("no llama.cpp source under .ext/: run with --build")
    vocab = src / "models" / "ggml-vocab-gpt-neox.gguf"
    print(f"torch {torch.__version__}, llama.cpp from {src.parent.parent.name}, load average {os.getloadavg()}")
    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    print("streaming read bandwidth: " + ", ".join(f"{t} thread(s) {gbs:.1f} GB/s" for t, gbs in bandwidth.items()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models:
            folder = Path(tmp) / preset
            model = make_weights(preset, folder / "hf")
            for file_type in args.types:
                theirs, ours = convert_both(src, folder, model, file_type, vocab)
                kind = TYPES[file_type]
                variant = ssmkit_variant(model, kind)
                try:
                    agree, compared, shown = greedy_agrees(src, ours, vocab)
                except subprocess.CalledProcessError as error:  # a llama.cpp crash is a finding, not the end of the run
                    agree, compared, shown = 0, 0, f"llama-simple failed: {error}; {error.stderr[-300:]!r}"
                print(f"{preset} {file_type}: converters wrote identical tensors; greedy tokens agreeing: "
                      f"{agree} of {compared} ({shown})", flush=True)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    samples = measure(variant, theirs, src, threads, args)
                    loads = samples.pop("load")
                    row = {"model": preset, "ssmkit": kind, "llama.cpp": file_type.upper(), "threads": threads,
                           "load": (min(loads), max(loads)), "greedy_agree": f"{agree}/{compared}",
                           "weight_bytes": weight_bytes_per_token(variant), "read_gbs": bandwidth[threads],
                           "overhead_ms": statistics.median(decode_overhead_ms(variant) for _ in range(3)),
                           **{k: statistics.median(v) for k, v in samples.items()}}
                    results.append(row)
                    print_row(row, args.lengths)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def measure(variant: LanguageModel, theirs: Path, src: Path, threads: int, args: argparse.Namespace) -> dict:
    """Rounds of ssmkit and llama.cpp alternating test by test (prefill at each length, then decode), each
    measurement with the 1-minute load average beside it: {key: [one value per round]}."""
    samples: dict[str, list[float]] = {}

    def add(**values: float) -> None:
        for key, value in (*values.items(), ("load", os.getloadavg()[0])):
            samples.setdefault(key, []).append(value)

    def llama(prompt: int, decode: int) -> tuple[float, float]:
        try:
            return llama_times(src, theirs, prompt, decode, threads)
        except subprocess.CalledProcessError as error:  # a crash is reported, the run goes on
            print(f"llama-bench failed: {error}", flush=True)
            return float("nan"), float("nan")

    for _ in range(args.rounds):
        for n in args.lengths:
            wall, cpu = ssmkit_prefill(variant, n)
            add(**{f"prefill{n}_ssmkit": wall, f"prefill{n}_ssmkit_cpu": cpu})
            theirs_ts, share = llama(n, 0)
            add(**{f"prefill{n}_llama": theirs_ts, f"prefill{n}_llama_share": share})
        wall, cpu = ssmkit_decode(variant, args.decode_tokens)
        add(decode_ssmkit=wall, decode_ssmkit_cpu=cpu)
        add(decode_ssmkit_layers=ssmkit_decode(variant, args.decode_tokens, layers=True)[0])
        theirs_ts, share = llama(0, args.decode_tokens)
        add(decode_llama=theirs_ts, decode_llama_share=share)
    return samples


def ssmkit_only(args: argparse.Namespace) -> int:
    """ssmkit's weight types beside each other (interleaved rounds, medians), ratios to fp32."""
    print(f"torch {torch.__version__}, load average {os.getloadavg()}")
    for preset in args.models:
        torch.manual_seed(0)
        model = LanguageModel(get_preset(preset)).eval()
        variants = {TYPES[t]: ssmkit_variant(model, TYPES[t]) for t in args.types}
        for threads in args.threads:
            torch.set_num_threads(threads)
            samples: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for kind, variant in variants.items():
                    for length in args.lengths:
                        samples.setdefault((kind, f"prefill {length}"), []).append(ssmkit_prefill(variant, length)[0])
                    samples.setdefault((kind, "decode"), []).append(ssmkit_decode(variant, args.decode_tokens)[0])
                    samples.setdefault((kind, "decode, layers' step"), []).append(
                        ssmkit_decode(variant, args.decode_tokens, layers=True)[0])
            columns = [*(f"prefill {n}" for n in args.lengths), "decode", "decode, layers' step"]
            print(f"| {preset}, {threads} thread(s), load {os.getloadavg()[0]:.1f} | " + " | ".join(columns) + " |")
            for kind in variants:
                cells = []
                for col in columns:
                    value, base = statistics.median(samples[(kind, col)]), statistics.median(samples[("fp32", col)])
                    cells.append(f"{value:.1f} ({value / base:.2f}x)")
                print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)
    return 0


def print_row(row: dict, lengths: list[int]) -> None:
    """One markdown row: wall-time tokens/s ssmkit / llama.cpp (ratio); ssmkit's tokens/s by its CPU time
    and the ratio to llama.cpp's tokens/s per CPU second (its wall-time figure over the CPU share it got:
    an estimate, llama-bench times wall only); decode's weight traffic by CPU time and its share of the
    streaming read; the non-matmul CPU time per token; the blocks' own step; the load average."""
    cells = [f"{row['model']}", f"{row['ssmkit']} / {row['llama.cpp']}", str(row["threads"])]
    for key in [f"prefill{n}" for n in lengths] + ["decode"]:
        ours, theirs, cpu = row[f"{key}_ssmkit"], row[f"{key}_llama"], row[f"{key}_ssmkit_cpu"]
        per_cpu = theirs / row[f"{key}_llama_share"]
        cells.append(f"{ours:.1f} / {theirs:.1f} ({ours / theirs:.2f}x); CPU {cpu:.1f} / {per_cpu:.1f} "
                     f"({cpu / per_cpu:.2f}x)")
    gbs = row["weight_bytes"] * row["decode_ssmkit_cpu"] / 1e9
    cells.append(f"{gbs:.1f} GB/s ({100 * gbs / row['read_gbs']:.0f}%), {row['overhead_ms']:.1f} ms")
    cells.append(f"{row['decode_ssmkit_layers']:.1f}")
    cells.append("{:.1f}-{:.1f}".format(*row["load"]))
    header = ["model", "weights", "threads", *(f"prefill {n}" for n in lengths), "decode",
              "decode weights read (of streaming), non-matmul CPU/token", "decode, layers' step", "load avg"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
