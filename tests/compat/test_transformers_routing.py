"""transformers' Mamba / Mamba-2 models on ssmkit's kernels after ``ssmkit.compat.install()``, on CPU.

One subprocess (install() changes the import system): the same tiny random model is built from
transformers' modeling module imported before install() (its PyTorch fallbacks) and again after it
(ssmkit's ops), and must give the same logits, the same greedy generations, and, in training mode (the
fused mamba_inner_fn / mamba_split_conv1d_scan_combined path), the same loss gradients; counters on the
compat functions prove that the kernels were called.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_transformers_models_take_ssmkit_kernels_and_match_their_fallbacks():
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = {k: v for k, v in report.items() if v != "ok"}
    assert not failures, failures


def _main() -> None:
    import collections
    import functools
    import importlib
    import warnings

    import torch
    import transformers

    import transformers.integrations.hub_kernels as hub

    if not hasattr(hub, "use_kernel_func_from_hub_with_fallback"):
        print(json.dumps({"skipped": "ok"}))  # transformers < 5.25 routes only on CUDA
        return
    from ssmkit.testing import assert_close

    torch.manual_seed(0)
    configs = {
        "mamba": (transformers.MambaConfig, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                                 expand=2, conv_kernel=4)),
        "mamba2": (transformers.Mamba2Config, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                                   expand=2, head_dim=8, num_heads=8, n_groups=2, chunk_size=16,
                                                   conv_kernel=4)),
        # A hybrid (Mamba-2 layers and attention) through the same wrappers.
        "bamba": (transformers.BambaConfig, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                 attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8,
                                                 mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=16,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)),
    }
    model_names = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "bamba": "BambaForCausalLM"}
    def model_class(kind):
        # From the modeling module as imported now: transformers' top-level attribute keeps the first class.
        modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        return getattr(modeling, model_names[kind])

    ids = torch.randint(0, 64, (2, 37))

    def outputs(model):
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
            gen = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        model.train()
        # use_cache=False: with a cache transformers skips the fused training path.
        loss = model(ids, labels=ids, use_cache=False).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        return logits, gen, loss.detach(), grads

    baseline, states = {}, {}
    for kind, (config_cls, kwargs) in configs.items():
        model = model_class(kind)(config_cls(**kwargs))
        states[kind] = model.state_dict()
        baseline[kind] = outputs(model)

    import ssmkit.compat

    for name in [n for n in sys.modules if n.startswith(tuple(f"transformers.models.{k}." for k in configs))]:
        del sys.modules[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that the modules above were imported before it
        ssmkit.compat.install()
    calls = collections.Counter()
    import causal_conv1d
    import mamba_ssm
    import mamba_ssm.ops.selective_scan_interface as scan
    import mamba_ssm.ops.triton.selective_state_update as step
    import mamba_ssm.ops.triton.ssd_combined as ssd

    for module, name in ((mamba_ssm, "selective_scan_fn"), (mamba_ssm, "mamba_inner_fn"), (scan, "selective_scan_fn"),
                         (scan, "mamba_inner_fn"), (step, "selective_state_update"),
                         (ssd, "mamba_chunk_scan_combined"), (ssd, "mamba_split_conv1d_scan_combined"),
                         (causal_conv1d, "causal_conv1d_fn"), (causal_conv1d, "causal_conv1d_update")):
        def counted(*args, _f=getattr(module, name), _n=name, **kwargs):
            calls[_n] += 1
            return _f(*args, **kwargs)
        setattr(module, name, functools.wraps(getattr(module, name))(counted))

    expected_calls = {
        "mamba": ("selective_scan_fn", "mamba_inner_fn", "selective_state_update", "causal_conv1d_fn",
                  "causal_conv1d_update"),
        "mamba2": ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "selective_state_update",
                   "causal_conv1d_fn", "causal_conv1d_update"),
        "bamba": ("mamba_chunk_scan_combined", "selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"),
    }
    report = {}
    for kind, (config_cls, kwargs) in configs.items():
        calls.clear()
        model = model_class(kind)(config_cls(**kwargs))
        model.load_state_dict(states[kind])
        logits, gen, loss, grads = outputs(model)
        base_logits, base_gen, base_loss, base_grads = baseline[kind]
        try:
            assert_close(logits, base_logits, torch.float32, name="logits")
            assert torch.equal(gen.sequences, base_gen.sequences), "greedy generations differ"
            for t, (a, b) in enumerate(zip(gen.logits, base_gen.logits)):
                assert_close(a, b, torch.float32, name=f"decode logits {t}")
            assert_close(loss, base_loss, torch.float32, name="training loss")
            for i, (a, b) in enumerate(zip(grads, base_grads)):
                assert_close(a, b, torch.float32, rtol=1e-3, name=f"gradient {i}")
            missing = [name for name in expected_calls[kind] if calls[name] == 0]
            assert not missing, f"not called: {missing} (calls: {dict(calls)})"
            report[kind] = "ok"
        except AssertionError as err:
            report[kind] = str(err)
    print(json.dumps(report))


if __name__ == "__main__":
    _main()
