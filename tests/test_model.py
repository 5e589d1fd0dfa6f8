"""The study's CNN sizes and the six optimizers with TF1's defaults."""

import keras
import numpy as np
import pytest

from pbt_lab import UserError
from pbt_lab.training.model import build_cnn
from pbt_lab.training.optimizers import OPTIMIZERS, TF1RMSprop, make_optimizer


@pytest.mark.parametrize(
    "scale, scale_dense, weights",
    [
        (1, False, 3_274_634),  # the study's model
        (2, False, 6_640_394),  # conv filters doubled, dense kept at 1024: about linear in scale
        (2, True, 13_074_186),  # dense doubled too
        (0.25, False, 817_514),
    ],
)
def test_weight_counts(scale, scale_dense, weights):
    assert build_cnn(scale=scale, scale_dense=scale_dense).count_params() == weights


def test_layers_follow_the_study():
    model = build_cnn(scale=1)
    conv1, _, conv2, _, _, dense, dropout, logits = model.layers
    assert (conv1.filters, conv1.kernel_size, conv1.padding) == (32, (5, 5), "same")
    assert (conv2.filters, dense.units, dropout.rate, logits.units) == (64, 1024, 0.4, 10)
    assert logits.activation is keras.activations.linear


@pytest.mark.parametrize("name", ["GD", "momentum", "Adam", "ADAGRAD", "adadelta", "RmsProp"])
def test_optimizers_by_case_insensitive_name(name):
    optimizer = make_optimizer(name, 0.01)
    assert isinstance(optimizer, OPTIMIZERS[name.lower()][0])
    assert float(optimizer.learning_rate) == pytest.approx(0.01)


def test_tf1_defaults_and_overrides():
    assert make_optimizer("momentum", 0.1).momentum == 0.5
    assert make_optimizer("gd", 0.1).momentum == 0.0
    assert make_optimizer("adam", 0.1).epsilon == 1e-8
    assert make_optimizer("adadelta", 0.1).epsilon == 1e-8
    assert make_optimizer("adagrad", 0.1).initial_accumulator_value == 0.1
    rms = make_optimizer("rmsprop", 0.1)
    assert isinstance(rms, TF1RMSprop) and (rms.rho, rms.epsilon, rms.momentum) == (0.9, 1e-10, 0.0)
    assert make_optimizer("adam", 0.1, epsilon=1e-3).epsilon == 1e-3


def test_rmsprop_mean_square_starts_at_one_like_tf1():
    model = build_cnn(scale=0.25)
    rms = make_optimizer("rmsprop", 0.1)
    rms.build(model.trainable_variables)
    assert all(np.all(v.numpy() == 1.0) for v in rms._velocities)


def test_unknown_optimizer_suggests_the_close_match():
    with pytest.raises(UserError, match=r"unknown optimizer 'adma' \(did you mean 'adam'\?\)"):
        make_optimizer("adma", 0.1)
