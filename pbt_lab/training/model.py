"""The study's CNN (the TensorFlow-tutorial MNIST network), with a width factor.

conv 5×5×32 → maxpool 2 → conv 5×5×64 → maxpool 2 → dense 1024 → dropout 0.4 → dense 10 (logits).
At scale 1: 3,274,634 weights.
"""

from __future__ import annotations

import keras
from keras import layers


def build_cnn(
    scale: float = 1.0,
    scale_dense: bool = False,
    dense_units: int = 1024,
    dropout: float = 0.4,
) -> keras.Model:
    """The study's CNN with conv filters (and, if ``scale_dense``, the dense layer) times ``scale``.

    The dense layer stays at ``dense_units`` by default, as in the code behind the study's figures,
    so the weight count grows about linearly with scale. Returns logits.
    """

    def width(n: int) -> int:
        return max(1, round(n * scale))

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(width(32), 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(width(64), 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(width(dense_units) if scale_dense else dense_units, activation="relu"),
            layers.Dropout(dropout),
            layers.Dense(10),
        ],
        name=f"cnn_x{scale:g}",
    )
