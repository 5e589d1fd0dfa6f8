"""The network a run trains: the study's CNN by default, or the user's own builder.

A builder is any function ``(input_shape, num_classes, scale, **options) -> keras.Model`` that
returns an uncompiled model whose output is ``num_classes`` logits; ``model.builder`` names it as
``"package.module:function"`` or ``"path/to/file.py:function"`` (the Python API also takes the
function itself). ``scale`` is the width factor the scaling study varies; a builder may ignore it.

The study's CNN (the TensorFlow-tutorial MNIST network), at scale 1 on 28×28×1: 3,274,634 weights.
conv 5×5×32 → maxpool 2 → conv 5×5×64 → maxpool 2 → dense 1024 → dropout 0.4 → dense (logits).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers

from pbt_lab import UserError
from pbt_lab.names import MODEL_OPTIONS


def build_cnn(
    input_shape: tuple[int, ...] = (28, 28, 1),
    num_classes: int = 10,
    scale: float = 1.0,
    *,
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
            keras.Input(tuple(input_shape)),
            layers.Conv2D(width(32), 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(width(64), 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(width(dense_units) if scale_dense else dense_units, activation="relu"),
            layers.Dropout(dropout),
            layers.Dense(num_classes),
        ],
        name=f"cnn_x{scale:g}",
    )


def resolve_builder(spec: str) -> Callable:
    """The function ``"module:function"`` or ``"file.py:function"`` names, or one line saying why not."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UserError(f"model.builder {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise UserError(f"model.builder {spec!r}: there is no file {path}")
            module_name = f"pbt_lab_builder_{path.stem}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module  # so its functions pickle by reference
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # the user's module failed to import: say how, in one line
        raise UserError(f"model.builder {spec!r}: cannot import {where} ({type(e).__name__}: {e})") from None
    builder = getattr(module, name, None)
    if where == "__main__" and not callable(builder):
        raise UserError(
            f"model.builder {spec!r} was a function defined in a notebook or script: "
            f"pass it again (builder=... in the Python API)"
        )
    if not callable(builder):
        raise UserError(f"model.builder {spec!r}: {where} has no function {name}")
    return builder


def builder_name(builder: Callable) -> str:
    """How a builder passed as a function is recorded in the config, summary and trials table."""
    if not callable(builder):
        raise UserError(f"the builder must be a function, got {type(builder).__name__}")
    target = getattr(builder, "func", builder)  # a functools.partial names its function
    name = getattr(target, "__qualname__", type(target).__qualname__)
    return f"{getattr(target, '__module__', None) or type(target).__module__}:{name}"


def build_model(
    builder: Callable | str,
    input_shape: tuple[int, ...],
    num_classes: int,
    scale: float = 1.0,
    options: dict | None = None,
) -> keras.Model:
    """The builder's model for this data, checked: a ``keras.Model`` with ``num_classes`` outputs
    that accepts one batch of ``input_shape``; otherwise one UserError line."""
    if isinstance(builder, str):
        builder = resolve_builder(builder)
    name = builder_name(builder)
    try:
        model = builder(tuple(input_shape), num_classes, scale, **(options or {}))
    except Exception as e:
        raise UserError(f"model.builder {name} failed to build a model ({type(e).__name__}: {e})") from None
    if not isinstance(model, keras.Model):
        raise UserError(f"model.builder {name} returned {type(model).__name__}, expected a keras.Model")
    try:
        shape = tuple(model.compute_output_spec(keras.KerasTensor((1, *input_shape))).shape)
    except Exception as e:
        raise UserError(
            f"model.builder {name}: the model does not take images of shape {tuple(input_shape)} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if shape != (1, num_classes):
        raise UserError(
            f"model.builder {name}: the model outputs shape {shape[1:]} per image, expected "
            f"({num_classes},): one logit per class"
        )
    return model


def check_options_keep_shapes(builder, data, model_cfg, model: keras.Model, searched: dict) -> None:
    """A searched builder option (``searched``: {key: values to try}, keys ``model.options.NAME``) must
    leave every weight's shape as ``model``'s (a recipient loads its donor's weights into a model rebuilt
    with its own options): the model is built at each value and compared; one line if a shape differs."""
    shapes = [tuple(w.shape) for w in model.weights]
    for key, values in searched.items():
        if not key.startswith(MODEL_OPTIONS + "."):
            continue
        name = key.removeprefix(MODEL_OPTIONS + ".")
        for value in values:
            options = {**model_cfg.options, name: value}
            built = build_model(builder, data.input_shape, data.num_classes, model_cfg.scale, options)
            if [tuple(w.shape) for w in built.weights] != shapes:
                raise UserError(
                    f"pbt.space.{key}: {name}={value!r} changes the model's weights "
                    f"({built.count_params():,} against {model.count_params():,}): weights must transfer "
                    f"between members, so a searched builder option may not change a weight's shape"
                )
