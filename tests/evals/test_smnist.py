"""ssmkit/data/images.py and ssmkit/evals/smnist.py: bundled images, the split, the --smoke run."""

import json

import numpy as np
import pytest

from ssmkit.cli import main
from ssmkit.data.images import load_pixel_sequences, stratified_split
from ssmkit.evals import smnist


@pytest.mark.parametrize("name, n, length", [("digits", 1797, 64), ("mnist", 5000, 784)])
def test_bundled_images_load_as_pixel_sequences(name, n, length):
    images = load_pixel_sequences(name)
    assert images.pixels.shape == (n, length) and images.length == length
    assert images.pixels.dtype == np.float32 and 0 <= images.pixels.min() and images.pixels.max() == 1
    assert images.labels.shape == (n,) and set(images.labels.tolist()) == set(range(10))
    assert images.num_classes == 10 and images.side**2 == length


def test_unknown_image_set_is_refused():
    with pytest.raises(ValueError, match="unknown image set 'cifar'.*digits"):
        load_pixel_sequences("cifar")


def test_stratified_split_keeps_class_proportions_and_is_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert len(set(train.tolist()) | set(test.tolist())) == len(labels) == len(train) + len(test)
    assert np.bincount(labels[test]).tolist() == [2, 4, 6, 8]
    again, _ = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="test_fraction"):
            stratified_split(labels, bad, seed=0)
    with pytest.raises(ValueError, match="class 0"):
        stratified_split(labels, 0.01, seed=0)


def test_bidirectional_mamba_is_refused():
    with pytest.raises(ValueError, match="--bidirectional applies to S4D only"):
        smnist.classifier_config("mamba", 32, 2, 16, True)
    with pytest.raises(ValueError, match="unknown model 'lstm'"):
        smnist.classifier_config("lstm", 32, 2, 16, False)


@pytest.mark.slow
def test_smoke_run_beats_chance(tmp_path, capsys):
    result = _cli(tmp_path, "eval", "smnist")
    assert result["table"] in capsys.readouterr().out and result["dataset"]["name"] == "digits"
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    (run,) = result["runs"]
    assert run["model"] == "s4d" and len(run["history"]) == result["settings"]["epochs"]
    # Chance is 10%; a few epochs of a tiny S4D on 64-pixel digits get far above it.
    assert run["test_accuracy"] > 0.4 > result["dataset"]["chance_accuracy"]


def _cli(tmp_path, kind, task, *extra):
    """Run ``ssmkit KIND TASK --smoke`` on CPU into tmp_path; its result.json."""
    assert main([kind, task, "--smoke", "--device", "cpu", "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "result.json").read_text())
