"""transformers' SSM hybrids vs ssmkit on this CPU, the same weights in both, side by side in one process.

Each model type has its own row function (``ROWS``, keyed by transformers' ``model_type``): it builds a random
transformers model of a published design at a CPU-sized width (or ``--tiny``), saves it, loads the folder with
``LanguageModel.from_pretrained`` (the same weights), and times the forward (no grad, no cache) at
``--length`` tokens and ``--decode`` greedy decode steps after a 16-token prompt (the prompt's prefill
included, the same on both sides), best of ``--repeats`` after a warm-up. Each row prints both timings, the
ratio (transformers / ssmkit: above 1 means ssmkit is faster), the logits' relative error, whether the greedy
tokens agree and the load average (1 minute) before and after the row.

``--clock cpu`` counts the process's CPU time instead of the wall clock, with one thread unless ``--threads``
says otherwise: on a machine shared with other jobs that is close to a quiet machine's wall time, where the
wall clock is inflated by however many other processes run (with several threads it sums them, so it does
not show parallel speed-up).

    python benchmarks/cpu_hybrids.py                                  # every row, L = 2048, 32 decode steps
    python benchmarks/cpu_hybrids.py --clock cpu --models bamba       # CPU time, one thread
    python benchmarks/cpu_hybrids.py --models zamba2 --shape 1.2b     # the published Zamba2-1.2B shape
    python benchmarks/cpu_hybrids.py --models falcon_h1 --layers 4    # 4 layers of the falcon-h1-0.5b shape
    python benchmarks/cpu_hybrids.py --models granitemoehybrid --layers 4  # Granite-4.0-H-Tiny's design, 768 wide
    python benchmarks/cpu_hybrids.py --tiny                           # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

# perf_counter (wall clock) by default; --clock cpu sets process_time (as benchmarks/cpu_transformers_compat.py).
CLOCK: Callable[[], float] = time.perf_counter


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def compare(name: str, hf: torch.nn.Module, args: argparse.Namespace) -> None:
    """Save ``hf``, load it with ssmkit, time both and print one row."""
    from ssmkit.models import LanguageModel
    from ssmkit.testing import relative_error

    load_before = os.getloadavg()[0]
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
    same = "yes" if hf_tokens == our_tokens else "NO"
    print(f"{name:<28} {hf_forward:>9.3f} {our_forward:>9.3f} {hf_forward / our_forward:>6.2f}x "
          f"{args.decode / hf_decode:>9.1f} {args.decode / our_decode:>9.1f} {hf_decode / our_decode:>6.2f}x "
          f"{error:>9.1e} {same:>4} {load_before:>5.1f}-{os.getloadavg()[0]:.1f}", flush=True)


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


# The CPU-sized width of the bamba, nemotron_h and granitemoehybrid rows: the published designs at d_model 768
# (Mamba-2 with 24 heads of 64, d_state 128; 12 query / 4 KV heads of 64), 10 mixer layers unless --layers,
# attention in the middle one, vocab 32000.
CPU_WIDTH, CPU_VOCAB, CPU_LAYERS = 768, 32000, 10


def bamba_rows(args: argparse.Namespace) -> None:
    """Bamba: ``bamba-9b``'s design at the CPU width (RoPE on half of each head, SwiGLU MLPs of 2688, 3.5x
    the width as in the 9B), or the tiny preset's shape."""
    import transformers

    from ssmkit.models import get_preset
    from ssmkit.models.config import AttentionConfig, Mamba2Config, MLPConfig
    from ssmkit.models.formats.bamba import bamba_config_to_transformers
    from ssmkit.models.presets import bamba_layer_pattern

    config = get_preset("bamba-tiny" if args.tiny else "bamba-9b")
    if not args.tiny:
        n = args.layers or CPU_LAYERS
        config.vocab_size, config.d_model, config.n_layer = CPU_VOCAB, CPU_WIDTH, n
        config.attention = AttentionConfig(num_heads=12, num_heads_kv=4, rotary_emb_dim=32)
        config.mamba2 = Mamba2Config(d_state=128, headdim=64, chunk_size=256)
        config.mlp = MLPConfig(d_intermediate=2688)
        config.layer_pattern = bamba_layer_pattern(n, (n // 2,))
    torch.manual_seed(0)
    hf = transformers.BambaForCausalLM(transformers.BambaConfig(
        **bamba_config_to_transformers(config, config.padded_vocab_size))).eval()
    compare(f"bamba-{'tiny' if args.tiny else f'768/{config.n_layer}L'} L={args.length}", hf, args)


def nemotron_h_rows(args: argparse.Namespace) -> None:
    """Nemotron-H: ``nemotron-h-8b``'s design at the CPU width (Mamba-2 in 8 groups, chunk 128, no positional
    encoding, squared-ReLU MLPs of 4032, 5.25x the width as in the 8B, after every mixer but the one before
    attention), or the tiny preset's shape."""
    import transformers

    from ssmkit.layers.ungated_mlp import UngatedMLPConfig
    from ssmkit.models import get_preset
    from ssmkit.models.config import AttentionConfig, Mamba2Config
    from ssmkit.models.formats.nemotron_h import nemotron_h_config_to_transformers
    from ssmkit.models.presets import nemotron_h_layer_pattern

    config = get_preset("nemotron-h-tiny" if args.tiny else "nemotron-h-8b")
    if not args.tiny:
        n = args.layers or CPU_LAYERS
        override = "".join("*-" if i == n // 2 else "M" if i + 1 == n // 2 else "M-" for i in range(n))
        config.vocab_size, config.d_model, config.n_layer = CPU_VOCAB, CPU_WIDTH, n
        config.attention = AttentionConfig(num_heads=12, num_heads_kv=4)
        config.mamba2 = Mamba2Config(d_state=128, headdim=64, ngroups=8, chunk_size=128)
        config.ungated_mlp = UngatedMLPConfig(d_intermediate=4032, activation="relu2")
        config.layer_pattern = nemotron_h_layer_pattern(override)
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        **nemotron_h_config_to_transformers(config, config.padded_vocab_size))).eval()
    compare(f"nemotron_h-{'tiny' if args.tiny else f'768/{config.n_layer}L'} L={args.length}", hf, args)


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


def granite_rows(args: argparse.Namespace) -> None:
    """Granite-4.0-H: ``granite-4.0-h-tiny``'s design at a CPU-sized width — 10 layers (attention at 5, no
    positional encoding), d_model 768, 12 query / 4 KV heads, Mamba-2 with 24 heads of 64, d_state 128, 64
    experts of 256 (top 6) plus a shared MLP of 512, Granite's multipliers, vocab 32000 — or the tiny preset's
    shape. ``--layers`` sets the depth (attention in the middle layer)."""
    import transformers

    from ssmkit.models import get_preset
    from ssmkit.models.config import AttentionConfig, Mamba2Config, MoEConfig
    from ssmkit.models.formats.granite import granite_config_to_transformers
    from ssmkit.models.presets import granite_hybrid_layer_pattern

    config = get_preset("granite-hybrid-tiny" if args.tiny else "granite-4.0-h-tiny")
    if not args.tiny:
        config.vocab_size, config.d_model, config.n_layer = CPU_VOCAB, CPU_WIDTH, args.layers or CPU_LAYERS
        config.attention = AttentionConfig(num_heads=12, num_heads_kv=4, softmax_scale=0.0078125)
        config.mamba2 = Mamba2Config(d_state=128, headdim=64, chunk_size=256)
        config.moe = MoEConfig(num_experts=64, top_k=6, d_intermediate=256, router_softmax="top_k",
                               shared_d_intermediate=512, router_aux_loss_coef=0.0)
        config.layer_pattern = granite_hybrid_layer_pattern(config.n_layer, (config.n_layer // 2,))
    torch.manual_seed(0)
    hf = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(
        **granite_config_to_transformers(config, config.padded_vocab_size))).eval()
    compare(f"granite-{'tiny' if args.tiny else f'h-768/{config.n_layer}L'} L={args.length}", hf, args)


ROWS: dict[str, Callable[[argparse.Namespace], None]] = {
    "bamba": bamba_rows, "granitemoehybrid": granite_rows, "nemotron_h": nemotron_h_rows,
    "falcon_h1": falcon_h1_rows, "zamba2": zamba2_rows,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    parser.add_argument("--shape", default="small", help="zamba2: small, 1.2b or 2.7b")
    parser.add_argument("--layers", type=int, default=0, help="falcon_h1: fewer layers than the published shape; "
                        "bamba, nemotron_h, granitemoehybrid: the mixer layers of their CPU-sized shapes (default 10)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (smoke run)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: the process's CPU time (one thread unless --threads)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 with --clock cpu)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    threads = args.threads or (1 if args.clock == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.tiny:
        args.length, args.decode, args.repeats = min(args.length, 64), min(args.decode, 8), 1

    import transformers

    import ssmkit

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(f"# {platform.processor() or platform.machine()} ({os.cpu_count()} cores), {torch.get_num_threads()} "
          f"threads, {args.clock} clock; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"ssmkit {ssmkit.__version__}; fp32, batch 1, best of {args.repeats}")
    print(f"{'model':<28} {'fwd hf s':>9} {'fwd ours':>9} {'ratio':>7} {'dec hf/s':>9} {'dec ours':>9} "
          f"{'ratio':>7} {'rel err':>9} same load")
    for name in args.models:
        ROWS[name](args)


if __name__ == "__main__":
    main()
