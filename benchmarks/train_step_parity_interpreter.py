"""On CPU: is ``gpu_train_step.py``'s mamba_ssm model the same model as ssmkit's? Loss and gradients compared.

:class:`mamba_ssm_lm.MambaSsmLM` (mamba_ssm's Block, Triton RMSNorm with fused add + norm, Mamba2 or Mamba3
mixers) is built at a tiny size beside ssmkit's :class:`~ssmkit.models.LanguageModel` of the same config, given
ssmkit's weights (moved away from their init values first), and both compute the loss of one random batch
and its gradients in float32. mamba_ssm's Triton kernels run in Triton's interpreter with the patches of
``mamba3_parity_interpreter.py`` (exact cos/sin/tanh instead of inline PTX, bfloat16 arithmetic for the
interpreter, CPU stand-ins for ``torch.cuda.device``, one autotune config). Prints the losses and each
parameter's gradient relative error ``||ours - theirs|| / ||theirs||``; exits 1 when the losses differ by more
than ``LOSS_TOLERANCE``.

mamba_ssm's Mamba-3 SISO wrapper computes in bfloat16 whatever the input dtype (see
``mamba3_parity_interpreter.py``), so the Mamba-3 model agrees to bfloat16 accuracy; Mamba-2 (float32
throughout) to float32 rounding.

Needs einops (mamba_ssm's modules import it) and mamba_ssm's source under ``.ext/``.

    python benchmarks/train_step_parity_interpreter.py [--models 2 3]     # about 2 min on one CPU core
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, by anything

import argparse
import sys

import mamba3_parity_interpreter as interp
import torch
from mamba_ssm_lm import build_peer

from ssmkit.models import LanguageModel, ModelConfig
from ssmkit.models.config import Mamba2Config, Mamba3Config

CONFIGS = {
    "2": lambda: ModelConfig(vocab_size=256, d_model=64, n_layer=2, layer_pattern="2",
                             mamba2=Mamba2Config(d_state=16, headdim=16, chunk_size=16)),
    "3": lambda: ModelConfig(vocab_size=256, d_model=64, n_layer=2, layer_pattern="3",
                             mamba3=Mamba3Config(d_state=16, headdim=16, chunk_size=16)),
}


# Largest |loss difference| accepted: float32 rounding for Mamba-2; bfloat16 for Mamba-3, whose mamba_ssm
# kernels compute in bfloat16 (a 2-layer model differs by ~5e-4 at a loss of ~5.6).
LOSS_TOLERANCE = {"2": 1e-5, "3": 5e-3}


def compare(letter: str) -> tuple[float, float, dict[str, float]]:
    """(ssmkit's loss, mamba_ssm's loss, gradient relative error per parameter) for one tiny model."""
    config = CONFIGS[letter]()
    torch.manual_seed(0)
    ours = LanguageModel(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    built = build_peer(config, device="cpu")
    if isinstance(built, str):
        sys.exit(f"mamba_ssm's model of layer pattern {letter!r} cannot be built: {built}")
    theirs, note = built
    print(f"layer pattern {letter!r}: mamba_ssm mixer {note}", flush=True)
    theirs.load_state_dict(ours.state_dict())
    interp._single_autotune_config()
    ids = torch.randint(0, config.vocab_size, (2, 41))
    with interp.cpu_cuda_stubs():
        loss_theirs = theirs(ids[:, :-1], ids[:, 1:])
        loss_theirs.backward()
    loss_ours = ours(ids[:, :-1], targets=ids[:, 1:]).loss
    loss_ours.backward()
    grads = dict(ours.named_parameters())
    errors = {name: ((grads[name].grad - p.grad).norm() / p.grad.norm()).item() for name, p in theirs.named_parameters()}
    return loss_ours.item(), loss_theirs.item(), errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS),
                        help="layer patterns: 2 (Mamba-2), 3 (Mamba-3)")
    args = parser.parse_args()
    interp.load_mamba_ssm("release")  # the Mamba-3 model asks for main's decay on top (mamba_ssm_source)
    failed = False
    for letter in args.models:
        ours, theirs, errors = compare(letter)
        print(f"  loss ssmkit {ours:.6f}, mamba_ssm {theirs:.6f} (difference {abs(ours - theirs):.1e})")
        print("  gradient relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errors.items(),
                                                                                             key=lambda kv: -kv[1])))
        failed |= abs(ours - theirs) > LOSS_TOLERANCE[letter]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
