"""CPU benchmark, ssmkit vs llama.cpp on the same weights: prefill and batch-1 decode, per weight type.

For each model shape (presets ``mamba-130m``, ``mamba2-130m``) random weights are saved as a transformers
folder; llama.cpp's own converter (``convert_hf_to_gguf.py``) and ssmkit's (:mod:`ssmkit.models.formats.gguf`)
each write it as F32, BF16 and Q8_0 GGUF files. The script checks that

- both converters wrote the same tensors (names, types, shapes, bytes);
- llama.cpp (``llama-simple``, greedy) continuing a prompt from ssmkit's file gives the same tokens as
  ssmkit's greedy decoding of the same weights (the prompt tokenised with the GGUF's own vocabulary);

then times, alternating ssmkit and llama.cpp within each round (median of ``--rounds``), at each thread
count: prefill of L tokens (ssmkit: one forward with logits for the last position; llama.cpp:
``llama-bench -p L``) and decode at batch 1 (ssmkit: single-token steps from a cache; ``llama-bench -n``),
tokens/s. ssmkit's weights are float32 / bfloat16 / weight-only int8 (``LanguageModel.quantize``) beside
llama.cpp's F32 / BF16 / Q8_0. ssmkit's decode is timed twice in each round: through the lean step that
``generate`` takes on CPU (:mod:`ssmkit.generation.lean`) and through the blocks' own step
(``forward_one_layers``), so that the gain of one over the other is measured under the same load. The load average is printed with each table: on a shared machine the
numbers are only comparable within one run.

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
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from ssmkit.generation.decode import forward_one_layers
from ssmkit.generation.lean import lean_decoder
from ssmkit.models import LanguageModel, get_preset
from ssmkit.models.formats.gguf import write_gguf

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / ".ext"
SIMPLE_INDEX = "https://pypi.org/simple/llama-cpp-python/"
TOOLS = ("llama-bench", "llama-simple")
# ssmkit weights beside llama.cpp's file type of the same bytes per weight.
TYPES = {"f32": "fp32", "bf16": "bf16", "q8_0": "int8"}


def find_llama_cpp() -> Path | None:
    """The newest vendored llama.cpp folder under .ext/ (from an unpacked llama-cpp-python sdist)."""
    found = sorted(EXT.glob("llama_cpp_python-*/vendor/llama.cpp"), key=lambda p: _version(p.parent.parent.name))
    return found[-1] if found else None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name.split("-", 1)[-1]))


def build(jobs: int) -> Path:
    """Fetch the newest llama-cpp-python sdist into .ext/ (if none is there) and build its llama.cpp tools."""
    src = find_llama_cpp()
    if src is None:
        EXT.mkdir(exist_ok=True)
        index = urllib.request.urlopen(SIMPLE_INDEX, timeout=60).read().decode()
        urls = re.findall(r'href="([^"]+/llama_cpp_python-([\d.]+)\.tar\.gz)[^"]*"', index)
        url, version = max(urls, key=lambda u: _version(u[1]))
        archive = EXT / f"llama_cpp_python-{version}.tar.gz"
        print(f"fetching {url}")
        urllib.request.urlretrieve(url, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(EXT, filter="data")
        src = find_llama_cpp()
        assert src is not None, f"no vendor/llama.cpp in {archive}"
    configure = ["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 *isa_options(), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    subprocess.run(configure, check=True)
    subprocess.run(["nice", "-n", "19", "cmake", "--build", str(src / "build"), "-j", str(jobs), "--target", *TOOLS],
                   check=True)
    return src


# ggml's x86 options and the /proc/cpuinfo flag each needs. AMX stays off: with -DGGML_NATIVE=ON (which
# turns it on where the CPU lists it) llama-bench died with SIGILL and llama-simple with SIGSEGV on Q8_0
# files on this VM, whose CPU lists amx_int8 / amx_tile.
ISA_FLAGS = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
             "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
             "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}


def isa_options() -> list[str]:
    """cmake options for the instruction sets this CPU lists (x86 Linux), AMX off; ``GGML_NATIVE`` elsewhere."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    have = set(flags.split(":", 1)[1].split())
    return ["-DGGML_NATIVE=OFF", *(f"-D{opt}={'ON' if flag in have else 'OFF'}" for opt, flag in ISA_FLAGS.items()),
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def tool(src: Path, name: str) -> Path:
    path = src / "build" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run with --build first")
    return path


def make_weights(preset: str, folder: Path) -> LanguageModel:
    """Random weights of ``preset`` (fixed seed), saved as a transformers folder for llama.cpp's converter."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset)).eval()
    model.save_pretrained(folder, format="transformers")
    return model


def convert_both(src: Path, folder: Path, model: LanguageModel, file_type: str, vocab: Path) -> tuple[Path, Path]:
    """(llama.cpp's file, ssmkit's file) of the same weights; raises if their tensors differ."""
    import gguf
    import numpy as np

    theirs, ours = folder / f"theirs-{file_type}.gguf", folder / f"ours-{file_type}.gguf"
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder / "hf"), "--outfile", str(theirs),
                    "--outtype", file_type], check=True, capture_output=True)
    write_gguf(model, ours, file_type, tokenizer=vocab)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = sorted(a) == sorted(b) and all(
        a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))
        for n in a)
    if not same:
        raise AssertionError(f"{file_type}: ssmkit's GGUF tensors differ from llama.cpp's converter's")
    return theirs, ours


def gguf_vocab(vocab: Path):
    """(a ``tokenizers`` byte-level BPE tokenizer, the bytes llama.cpp prints for each token id) from a GGUF
    file's gpt2 vocabulary. Normal tokens print their byte-level decoding, other types their text as is
    (``llama_token_to_piece`` with ``special``), so outputs compare byte for byte even where a token ends
    inside a UTF-8 character."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(vocab)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.get_field("tokenizer.ggml.merges").contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    byte_of = _byte_level_inverse()
    pieces = [bytes(byte_of[c] for c in t) if k == gguf.TokenType.NORMAL and all(c in byte_of for c in t)
              else t.encode() for t, k in zip(tokens, types)]
    return tok, pieces


def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def greedy_agrees(src: Path, gguf_file: Path, vocab: Path, n: int = 16) -> tuple[int, int, str]:
    """How many of ssmkit's ``n`` greedy tokens llama.cpp (``llama-simple``) reproduces continuing the same
    prompt, both running ``gguf_file`` (ssmkit dequantises it to float32; llama.cpp's BF16 and Q8_0 dot
    products also round the activations, so only F32 must agree in full). Compared on llama-simple's
    printed bytes: (tokens agreeing from the start, tokens compared, the two continuations shown).
    llama-simple stops early at an end-of-text token; only the tokens both produced are compared."""
    model = LanguageModel.from_pretrained(gguf_file).eval()
    tok, pieces = gguf_vocab(vocab)
    prompt = "The state space model reads the prompt once and then"
    ids = tok.encode(prompt).ids
    out = subprocess.run([str(tool(src, "llama-simple")), "-m", str(gguf_file), "-n", str(n), prompt],
                         capture_output=True, check=True, timeout=600).stdout
    theirs = out[:-1] if out.endswith(b"\n") else out
    prefix = b"".join(pieces[i] for i in ids)
    if not theirs.startswith(prefix):
        return 0, 0, f"llama.cpp printed the prompt as {theirs[:len(prefix) + 20]!r}, tokenised differently"
    with torch.no_grad():
        new = model.generate([ids], max_new_tokens=n, temperature=0)[0]
    rest, agree = theirs[len(prefix):], 0
    for token in new:
        piece = pieces[token]
        if not rest.startswith(piece):
            break
        rest, agree = rest[len(piece):], agree + 1
    compared = len(new) if rest else agree  # nothing left: llama.cpp stopped at end-of-text
    ours = b"".join(pieces[i] for i in new)
    return agree, compared, f"llama.cpp: {theirs[len(prefix):][:60]!r} | ssmkit: {ours[:60]!r}"


def ssmkit_times(model: LanguageModel, length: int, decode_tokens: int) -> tuple[float, float, float]:
    """(prefill tokens/s of ``length`` tokens, decode tokens/s of ``decode_tokens`` steps through the lean
    step that ``generate`` takes on CPU, the same through the blocks' own step), batch 1."""
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        prefill = length / (time.perf_counter() - start)
        cache = model.allocate_cache(1)
        lean = lean_decoder(model, cache)  # once per generation, as generate() gets it
        assert lean is not None, "the lean decode step does not apply to this model"
        decode = []
        for step in (lambda t: lean(t, cache), lambda t: forward_one_layers(model, t, cache)):
            token = torch.tensor([1])
            step(token)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = step(token).argmax(-1)
            decode.append(decode_tokens / (time.perf_counter() - start))
    return prefill, *decode


def llama_times(src: Path, gguf_file: Path, length: int, decode_tokens: int, threads: int) -> tuple[float, float]:
    out = subprocess.run([str(tool(src, "llama-bench")), "-m", str(gguf_file), "-p", str(length), "-n",
                          str(decode_tokens), "-t", str(threads), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=1800).stdout
    rows = json.loads(out)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] == length and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] == decode_tokens and r["n_prompt"] == 0)
    return prefill, decode


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
    print("streaming read bandwidth: " + ", ".join(f"{t} thread(s) {read_bandwidth(t):.1f} GB/s" for t in args.threads))
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
                    samples: dict[str, list[float]] = {}
                    for _ in range(args.rounds):
                        for length in args.lengths:
                            p_ours, d_ours, d_layers = ssmkit_times(variant, length, args.decode_tokens)
                            try:
                                p_theirs, d_theirs = llama_times(src, theirs, length, args.decode_tokens, threads)
                            except subprocess.CalledProcessError as error:
                                print(f"llama-bench failed: {error}", flush=True)
                                p_theirs = d_theirs = float("nan")
                            for key, value in ((f"prefill{length}_ssmkit", p_ours), (f"prefill{length}_llama", p_theirs),
                                               ("decode_ssmkit", d_ours), ("decode_llama", d_theirs),
                                               ("decode_ssmkit_layers", d_layers), ("load", os.getloadavg()[0])):
                                samples.setdefault(key, []).append(value)
                    loads = samples.pop("load")
                    row = {"model": preset, "ssmkit": kind, "llama.cpp": file_type.upper(), "threads": threads,
                           "load": (min(loads), max(loads)), "greedy_agree": f"{agree}/{compared}",
                           "weight_bytes": weight_bytes_per_token(variant),
                           **{k: statistics.median(v) for k, v in samples.items()}}
                    results.append(row)
                    print_row(row, args.lengths)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


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
                        prefill, decode, layers = ssmkit_times(variant, length, args.decode_tokens)
                        samples.setdefault((kind, f"prefill {length}"), []).append(prefill)
                        samples.setdefault((kind, "decode"), []).append(decode)
                        samples.setdefault((kind, "decode, layers' step"), []).append(layers)
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
    cells = [f"{row['model']}", f"{row['ssmkit']} / {row['llama.cpp']}", str(row["threads"])]
    for length in lengths:
        ours, theirs = row[f"prefill{length}_ssmkit"], row[f"prefill{length}_llama"]
        cells.append(f"{ours:.0f} / {theirs:.0f} ({ours / theirs:.2f}x)")
    cells.append(f"{row['decode_ssmkit']:.1f} / {row['decode_llama']:.1f} ({row['decode_ssmkit'] / row['decode_llama']:.2f}x)")
    cells[-1] += f", {row['weight_bytes'] * row['decode_ssmkit'] / 1e9:.1f} GB/s of weights"
    layers = row["decode_ssmkit_layers"]
    cells.append(f"{layers:.1f} ({layers / row['decode_llama']:.2f}x; lean {row['decode_ssmkit'] / layers:.2f}x it)")
    cells.append("{:.1f}-{:.1f}".format(*row["load"]))
    header = ["model", "weights", "threads", *(f"prefill {n}: ssmkit / llama.cpp" for n in lengths),
              "decode: ssmkit / llama.cpp", "decode, ssmkit's layers' step", "load avg"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
