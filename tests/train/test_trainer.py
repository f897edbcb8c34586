import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssmkit.data import DataConfig
from ssmkit.models import LanguageModel, Mamba2Config, ModelConfig, MoEConfig, get_preset
from ssmkit.testing import assert_close
from ssmkit.train import TrainConfig, Trainer, TrainingError, lr_at
from ssmkit.train import checkpoint as ckpt
from ssmkit.train import trainer as trainer_module

DATA = DataConfig(paths=[str(Path(sysconfig.get_paths()["stdlib"]) / "json")], seq_len=32)


def _model(preset="debug-mamba2"):
    config = get_preset(preset)
    config.vocab_size = 259
    return config


def _train(out, **overrides):
    settings = dict(steps=12, batch_size=4, warmup_steps=3, log_every=1, eval_every=0, eval_tokens=512,
                    checkpoint_every=4, checkpoint_minutes=0, sample_tokens=0, progress=False)
    settings.update(overrides)
    resume = settings.pop("resume", False)
    return Trainer(_model(), TrainConfig(**settings), DATA, out, resume=resume).fit()


def _losses(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_lr_schedule_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=100, min_lr_ratio=0.1)
    assert [lr_at(cfg, s, s / 100) for s in range(3)] == pytest.approx([0.25 * c for c in (1, 2, 3)], rel=1e-3)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    assert lr_at(cfg, 10, 2.0) == pytest.approx(0.1)


def test_run_writes_checkpoints_metrics_plot_and_a_loadable_model(tmp_path):
    result = _train(tmp_path, sample_tokens=5, keep_checkpoints=2)
    assert result["step"] == 12 and math.isfinite(result["val_bpb"])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000012", "step_0000008"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    assert sorted(_losses(tmp_path)) == list(range(1, 13))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert result["sample"].startswith("def ")
    model = LanguageModel.from_pretrained(tmp_path / "model")
    same = LanguageModel.from_pretrained(tmp_path / "checkpoints" / "step_0000012")
    for (name, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError, match="--resume"):
        _train(tmp_path)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _train(tmp_path)
    full = _losses(tmp_path)
    weights = tmp_path / "checkpoints" / "step_0000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step_0000012 is corrupt, falling back"):
        folder, state = ckpt.find_resumable(tmp_path / "checkpoints")
    assert folder.name == "step_0000008" and state["counters"]["step"] == 8
    with pytest.warns(UserWarning, match="corrupt"):
        _train(tmp_path, resume=True)
    assert _losses(tmp_path) == full


def test_flipped_byte_is_caught_by_the_hash(tmp_path):
    _train(tmp_path, steps=4)
    opt = tmp_path / "checkpoints" / "step_0000004" / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-3] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpoint, match="optimizer.safetensors: size or SHA-256 differs"):
        ckpt.verify(opt.parent)


def test_gradient_accumulation_gives_the_same_training(tmp_path):
    _train(tmp_path / "one", steps=6)
    _train(tmp_path / "two", steps=6, grad_accum=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())), name="losses")


class _Poisoned(LanguageModel):
    """Returns NaN logits and loss on the training forwards listed in ``bad`` (1-based)."""

    bad: set[int] = set()
    calls = 0

    def forward(self, input_ids, **kwargs):
        out = super().forward(input_ids, **kwargs)
        if self.training:
            type(self).calls += 1
            if type(self).calls in type(self).bad:
                out.logits = out.logits * float("nan")
                out.loss_sum = out.loss_sum * float("nan")
        return out


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "LanguageModel", _Poisoned)
    monkeypatch.setattr(_Poisoned, "bad", {3, 5})
    monkeypatch.setattr(_Poisoned, "calls", 0)
    result = _train(tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=10)
    assert result["bad_steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3, 5]

    def weights(step):
        return load_file(tmp_path / "checkpoints" / f"step_{step:07d}" / "model.safetensors")

    for skipped in (3, 5):
        before, after = weights(skipped - 1), weights(skipped)
        assert all(torch.equal(before[k], after[k]) for k in before), f"step {skipped} changed the weights"
    assert not all(torch.equal(a, b) for a, b in zip(weights(3).values(), weights(4).values()))


def test_too_many_nan_steps_stop_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "LanguageModel", _Poisoned)
    monkeypatch.setattr(_Poisoned, "bad", set(range(1, 100)))
    monkeypatch.setattr(_Poisoned, "calls", 0)
    with pytest.raises(TrainingError, match=r"4 steps had a NaN/inf loss .*max_bad_steps = 3"):
        _train(tmp_path, max_bad_steps=3)


def test_timed_run_stops_on_time(tmp_path):
    result = _train(tmp_path, steps=1, time_minutes=0.02, checkpoint_every=0)
    assert result["step"] > 1 and 1.2 <= result["elapsed_s"] < 30


def test_bf16_autocast_trains(tmp_path):
    """The mixed-precision path (what GPUs use by default), run on CPU with bf16 autocast."""
    result = _train(tmp_path, steps=3, precision="bf16", checkpoint_every=0)
    losses = _losses(tmp_path)
    assert result["step"] == 3 and all(math.isfinite(v) for v in losses.values())


def _moe_run(out, coef):
    """A short run of a Mamba-2 + MoE (top-1 of 4 experts) model; returns its metrics records."""
    config = ModelConfig(vocab_size=259, d_model=32, n_layer=2, layer_pattern="2e",
                         mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=16),
                         moe=MoEConfig(num_experts=4, top_k=1, d_intermediate=32, router_aux_loss_coef=coef))
    settings = TrainConfig(steps=20, batch_size=4, warmup_steps=3, lr=1e-2, log_every=1, eval_every=0,
                           eval_tokens=512, checkpoint_every=0, checkpoint_minutes=0, sample_tokens=0, progress=False)
    Trainer(config, settings, DATA, out).fit()
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_load_balancing_reaches_training_and_evens_the_expert_load(tmp_path):
    """The router loss is part of what the trainer minimises: with its coefficient on, the routing stays
    more even (higher entropy of the share of tokens per expert) than the same run with it off, and
    metrics.jsonl records the auxiliary losses."""
    off, on = _moe_run(tmp_path / "off", 0.0), _moe_run(tmp_path / "on", 1.0)
    assert all({"aux_loss", "z_loss", "expert_entropy"} <= r.keys() for r in off + on)
    assert all(0 <= r["expert_entropy"] <= math.log(4) + 1e-9 and r["aux_loss"] > 0 for r in on)

    def late(records, key):
        return sum(r[key] for r in records[-8:]) / 8

    assert late(on, "expert_entropy") > late(off, "expert_entropy") + 0.1
    assert late(on, "aux_loss") < late(off, "aux_loss")
