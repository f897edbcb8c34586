"""transformers' SSM hybrids against ssmkit on this CPU, the same random weights in both: a forward at length L
(no cache) and greedy decoding with the cache, side by side in one process, with ratios and the logits' and
tokens' agreement.

Each model type has its own rows function (``falcon_h1_rows``, ...), listed in ``ROWS``: it builds the
transformers model, writes it with ``save_pretrained``, loads that folder with ``LanguageModel.from_pretrained``
and hands both to :func:`compare`.

    python benchmarks/cpu_hybrids.py                               # every model type, L = 2048, 32 decode steps
    python benchmarks/cpu_hybrids.py --model falcon_h1 --layers 4  # fewer layers of the published shape
    python benchmarks/cpu_hybrids.py --tiny                        # a seconds-long smoke run
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
def compare(name: str, hf: torch.nn.Module, ours: torch.nn.Module, args: argparse.Namespace) -> None:
    """Print one model type's rows: forward at ``args.length`` and ``args.decode`` greedy steps, both sides."""
    import transformers

    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    ref = hf(ids, use_cache=False).logits
    got = ours(ids).logits[..., :vocab]
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    hf_s = _best(lambda: hf(ids, use_cache=False), args.repeats)
    our_s = _best(lambda: ours(ids), args.repeats)
    prompt = ids[:, :16]
    kwargs = {"max_new_tokens": args.decode, "min_new_tokens": args.decode, "do_sample": False}
    hf_tokens = hf.generate(prompt, **kwargs)[0, 16:]
    our_tokens = ours.generate(prompt, args.decode, temperature=0)[0, 16:]
    agree = int((hf_tokens == our_tokens).cumprod(0).sum())
    hf_tps = args.decode / _best(lambda: hf.generate(prompt, **kwargs), args.repeats)
    our_tps = args.decode / _best(lambda: ours.generate(prompt, args.decode, temperature=0), args.repeats)
    print(f"{name}: {sum(p.numel() for p in ours.parameters()):,} parameters, L {args.length}, batch 1, fp32, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"  forward: transformers {hf_s:.3f} s | ssmkit {our_s:.3f} s | ratio {hf_s / our_s:.2f}x | "
          f"logits max rel. diff {err:.2e}")
    print(f"  decode ({args.decode} tokens after 16): transformers {hf_tps:.1f} tok/s | ssmkit {our_tps:.1f} tok/s | "
          f"ratio {our_tps / hf_tps:.2f}x | greedy tokens agree {agree}/{args.decode}")


def _load_ours(hf: torch.nn.Module) -> torch.nn.Module:
    from ssmkit.models import LanguageModel

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(Path(folder))
        return LanguageModel.from_pretrained(folder).eval()


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
    compare("falcon_h1" + (" (tiny)" if args.tiny else f" ({config.n_layer} layers of falcon-h1-0.5b)"), hf,
            _load_ours(hf), args)


ROWS: dict[str, Callable[[argparse.Namespace], None]] = {"falcon_h1": falcon_h1_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(ROWS), action="append", help="model types (default: all)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32, help="greedy decode steps after a 16-token prompt")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the published shape")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (smoke run)")
    args = parser.parse_args()
    for name in args.model or ROWS:
        ROWS[name](args)


if __name__ == "__main__":
    main()
