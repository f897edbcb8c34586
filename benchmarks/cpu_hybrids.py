"""transformers' SSM hybrids vs ssmkit on this CPU, the same weights in both, side by side in one process.

Each model type has its own row function (``ROWS``): it builds a random transformers model of a published
shape (or ``--tiny``), saves it, loads the folder with ``LanguageModel.from_pretrained`` (the same
weights), and times the forward (no grad, no cache) at ``--length`` tokens and ``--decode`` greedy decode
steps after a 16-token prompt, best of ``--repeats``. Each row prints both timings, the ratio
(transformers / ssmkit: above 1 means ssmkit is faster), the logits' relative error and whether the greedy
tokens agree.

    python benchmarks/cpu_hybrids.py                                  # every row, L = 2048, 32 decode steps
    python benchmarks/cpu_hybrids.py --models zamba2 --shape 1.2b     # the published Zamba2-1.2B shape
    python benchmarks/cpu_hybrids.py --models falcon_h1 --layers 4    # 4 layers of the falcon-h1-0.5b shape
    python benchmarks/cpu_hybrids.py --tiny                           # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
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


def compare(name: str, hf: torch.nn.Module, args: argparse.Namespace) -> None:
    """Save ``hf``, load it with ssmkit, time both and print one row."""
    from ssmkit.models import LanguageModel
    from ssmkit.testing import relative_error

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = LanguageModel.from_pretrained(Path(folder)).eval()
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :16]
    with torch.no_grad():
        error = relative_error(ours(ids).logits[..., :vocab], hf(ids, use_cache=False).logits)
        hf_forward = _best(lambda: hf(ids, use_cache=False), args.repeats)
        our_forward = _best(lambda: ours(ids), args.repeats)
        steps = {"max_new_tokens": args.decode, "min_new_tokens": args.decode, "do_sample": False}
        hf_tokens = hf.generate(prompt, **steps)[0, 16:].tolist()
        our_tokens = ours.generate(prompt, args.decode, temperature=0)[0, 16:].tolist()
        hf_decode = _best(lambda: hf.generate(prompt, **steps), args.repeats)
        our_decode = _best(lambda: ours.generate(prompt, args.decode, temperature=0), args.repeats)
    print(f"{name:<24} {hf_forward:>9.3f} {our_forward:>9.3f} {hf_forward / our_forward:>6.2f}x "
          f"{args.decode / hf_decode:>9.1f} {args.decode / our_decode:>9.1f} {hf_decode / our_decode:>6.2f}x "
          f"{error:>9.1e} {'yes' if hf_tokens == our_tokens else 'NO'}", flush=True)


# Zamba2: random weights of the published shapes (Zyphra/Zamba2-1.2B, -2.7B), a 12-layer one of the same
# design that fits a CPU run, or a tiny one.
ZAMBA2_SHAPES = {
    "small": {"hidden_size": 768, "num_hidden_layers": 12, "layers_block_type": (["mamba"] * 5 + ["hybrid"]) * 2,
              "mamba_d_state": 64, "n_mamba_heads": 24, "num_attention_heads": 16, "intermediate_size": 3072,
              "num_mem_blocks": 2, "use_shared_attention_adapter": True, "use_mem_rope": True},
    "1.2b": {"hidden_size": 2048, "num_hidden_layers": 38, "layers_block_type": (["mamba"] * 5 + ["hybrid"]) * 6
             + ["mamba"] * 2, "mamba_d_state": 128, "n_mamba_heads": 64, "num_attention_heads": 32,
             "intermediate_size": 8192, "num_mem_blocks": 1, "use_shared_attention_adapter": True,
             "use_mem_rope": True},
    "2.7b": {"hidden_size": 2560, "num_hidden_layers": 54, "mamba_d_state": 64, "n_mamba_heads": 80,
             "num_attention_heads": 32, "intermediate_size": 10240, "num_mem_blocks": 2,
             "use_shared_attention_adapter": False, "use_mem_rope": True},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
             "mamba_d_state": 16, "n_mamba_heads": 8, "num_attention_heads": 4, "intermediate_size": 128,
             "num_mem_blocks": 2, "use_shared_attention_adapter": True, "use_mem_rope": True, "adapter_rank": 8,
             "chunk_size": 32},
}


def falcon_h1_rows(args: argparse.Namespace) -> None:
    """Falcon-H1 in the shape of ``falcon-h1-0.5b`` (``--layers`` cuts its depth), or a tiny one."""
    import transformers

    from ssmkit.models import get_preset
    from ssmkit.models.formats.falcon_h1 import falcon_h1_config_to_transformers

    config = get_preset("falcon-h1-tiny" if args.tiny else "falcon-h1-0.5b")
    if args.layers:
        config.n_layer = args.layers
    torch.manual_seed(0)
    hf = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
        **falcon_h1_config_to_transformers(config, config.padded_vocab_size))).eval()
    compare(f"falcon_h1-{'tiny' if args.tiny else f'0.5b/{config.n_layer}L'} L={args.length}", hf, args)


def zamba2_rows(args: argparse.Namespace) -> None:
    import transformers

    shape = "tiny" if args.tiny else args.shape
    config = transformers.Zamba2Config(vocab_size=32000, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                       **ZAMBA2_SHAPES[shape])
    torch.manual_seed(0)
    hf = transformers.Zamba2ForCausalLM(config).eval()
    compare(f"zamba2-{shape} L={args.length}", hf, args)


ROWS: dict[str, Callable[[argparse.Namespace], None]] = {"falcon_h1": falcon_h1_rows, "zamba2": zamba2_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    parser.add_argument("--shape", default="small", help="zamba2: small, 1.2b or 2.7b")
    parser.add_argument("--layers", type=int, default=0, help="falcon_h1: fewer layers than the published shape")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (smoke run)")
    args = parser.parse_args()
    if args.tiny:
        args.length, args.decode, args.repeats = min(args.length, 64), min(args.decode, 8), 1

    import transformers

    import ssmkit

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, ssmkit {ssmkit.__version__}")
    print(f"{'model':<24} {'fwd hf s':>9} {'fwd ours':>9} {'ratio':>7} {'dec hf/s':>9} {'dec ours':>9} "
          f"{'ratio':>7} {'rel err':>9} same tokens")
    for name in args.models:
        ROWS[name](args)


if __name__ == "__main__":
    main()
