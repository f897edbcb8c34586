"""What the parity tests of the hybrid transformers formats (Jamba, Bamba, Nemotron-H) share: random models,
token ids, a hand-written checkpoint folder, and the checks every format runs against transformers (same
logits and greedy tokens, decode equal to the parallel forward, sharded folders, the convert CLI both ways)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ssmkit.interop import load_transformers_checkpoint
from ssmkit.testing import relative_error


@torch.no_grad()
def randomize_hybrid_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values for the parameters initialised to constants (A_log, D, dt bias, norms, biases)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.empty(p.shape).uniform_(math.log(0.5), math.log(8.0), generator=g))
        elif leaf in ("D", "dt_bias") or name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def random_hf_model(model_class: type, config_class: type, kwargs: dict, seed: int,
                    randomize: Callable[[torch.nn.Module, int], torch.nn.Module]) -> torch.nn.Module:
    """``model_class(config_class(**kwargs))`` seeded with ``seed``, randomised with ``seed + 1``, in eval mode."""
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs))
    return randomize(model, seed + 1).eval()


def saved_hf_folder(tmp_path_factory, model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, Path]:
    """``(model, folder)`` after ``model.save_pretrained(folder)`` in a fresh temporary folder."""
    folder = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(folder)
    return model, folder


def token_ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def write_checkpoint(folder: Path, raw: dict, weights: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint folder by hand: config.json from ``raw`` and, if given, ``weights`` as model.safetensors."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    if weights is not None:
        save_file(weights, str(folder / "model.safetensors"))


def assert_same_logits_and_greedy_tokens(hf: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor,
                                         prompt_len: int, *, same_vocab: bool = False) -> None:
    """Logits within 1e-4 (relative) of transformers' on ``ids`` (ours cut to its vocabulary, or of the same
    shape with ``same_vocab``) and the same 20 greedy tokens after ``ids[:1, :prompt_len]``."""
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).logits
        prompt = ids[:1, :prompt_len]
        hf_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, prompt_len:]
        our_tokens = model.generate(prompt, 20, temperature=0)[0, prompt_len:]
    if same_vocab:
        assert ours.shape == ref.shape
    assert relative_error(ours[..., :ref.shape[-1]], ref) <= 1e-4
    assert our_tokens.tolist() == hf_tokens.tolist()


def assert_decode_equals_parallel_forward(model: torch.nn.Module, ids: torch.Tensor, prefix: int) -> None:
    """A prefill of ``prefix`` tokens then one-token steps give the parallel forward's logits (1e-5)."""
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(ids.shape[0])
        steps = [model(ids[:, :prefix], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(prefix, ids.shape[1])]
    assert relative_error(torch.cat(steps, dim=1), full) <= 1e-5


def assert_sharded_folder_is_read(hf: torch.nn.Module, folder: Path, sharded: Path) -> dict[str, torch.Tensor]:
    """``hf`` saved in several shards to ``sharded`` loads the same state as ``folder``; returns that state."""
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    _, whole = load_transformers_checkpoint(folder)
    _, from_shards = load_transformers_checkpoint(sharded)
    assert whole.keys() == from_shards.keys() and all(torch.equal(whole[n], from_shards[n]) for n in whole)
    return whole


def convert_there_and_back(folder: Path, tmp_path: Path, hf_class: type) -> torch.nn.Module:
    """``ssmkit convert`` of ``folder`` to ssmkit and back to transformers, loaded by ``hf_class``."""
    from ssmkit.cli import main

    assert main(["convert", str(folder), str(tmp_path / "ours"), "--to", "ssmkit"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "transformers"]) == 0
    return hf_class.from_pretrained(tmp_path / "back").eval()
