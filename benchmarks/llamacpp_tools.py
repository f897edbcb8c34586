"""llama.cpp beside ssmkit for benchmarks/cpu_llamacpp.py: build llama.cpp's tools from the source that the
``llama-cpp-python`` source distribution vendors, convert the same weights with both converters, and compare
greedy tokens through ``llama-simple``."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import torch

from ssmkit.models import LanguageModel
from ssmkit.models.formats.gguf import write_gguf

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / ".ext"
SIMPLE_INDEX = "https://pypi.org/simple/llama-cpp-python/"
TOOLS = ("llama-bench", "llama-simple")


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
