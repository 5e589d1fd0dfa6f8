"""A Trainer's whole state on disk, and its digests.

A checkpoint is a directory with the arrays (``trainer.npz``: weights, dropout RNG, optimizer
slots) and JSON metadata (``trainer.json``: optimizer, rate, progress, data order, and what the
caller adds): no pickle, no graph, loaded with ``allow_pickle=False``. N steps straight equal k
steps, save, restore, N − k steps.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pbt_lab import UserError
from pbt_lab.digest import digest
from pbt_lab.names import CHECKPOINT_ARRAYS, CHECKPOINT_META, LR, OPTIMIZER
from pbt_lab.training.optimizers import slots_digest
from pbt_lab.training.state import Progress

ARRAYS = CHECKPOINT_ARRAYS


def save(trainer, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``trainer``'s whole state to ``directory`` (with ``extra`` in the metadata)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    optimizer = trainer.optimizers.optimizer
    arrays = {f"model/{i}": v.numpy() for i, v in enumerate(trainer.model.variables)}
    arrays |= {f"optimizer/{i}": v.numpy() for i, v in enumerate(optimizer.variables)}
    meta = {
        "format": 1,
        OPTIMIZER: trainer.optimizers.name,
        LR: trainer.optimizers.lr,
        **trainer.progress.meta(),
        "data_order": trainer.order.state(),
        "model": asdict(trainer.model_cfg),
        "model_variables": [v.path for v in trainer.model.variables],
        "optimizer_variables": [v.path for v in optimizer.variables],
        **(extra or {}),
    }
    # Write beside, then rename: a crash mid-save never leaves a half-written checkpoint.
    for name, write in (
        (ARRAYS, lambda f: np.savez(f, **arrays)),
        (CHECKPOINT_META, lambda f: f.write(json.dumps(meta).encode())),
    ):
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
            write(f)
        os.replace(f.name, directory / name)
    return directory


def restore(trainer, directory: str | os.PathLike) -> dict:
    """Load a state saved by ``save`` into ``trainer``: weights, progress and data order always;
    optimizer slots only when the saved optimizer is the live one (fresh slots otherwise). The
    live learning rate is re-assigned afterwards: Keras would otherwise restore the saved one.
    Returns the checkpoint's metadata."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CHECKPOINT_META).read_text())
        with np.load(directory / ARRAYS, allow_pickle=False) as f:
            arrays = dict(f)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {directory} is missing or corrupt ({e})") from e
    shapes = [tuple(v.shape) for v in trainer.model.variables]
    if [arrays.get(f"model/{i}", np.empty(0)).shape for i in range(len(shapes))] != shapes:
        raise UserError(
            f"checkpoint {directory} holds a model of another shape (saved with {meta.get('model')})"
        )
    for i, v in enumerate(trainer.model.variables):
        v.assign(arrays[f"model/{i}"])
    bank = trainer.optimizers
    if meta[OPTIMIZER] == bank.name:
        for i, v in enumerate(bank.optimizer.variables):
            v.assign(arrays[f"optimizer/{i}"])
    else:
        # A different one starts fresh, with the live in-flight arguments.
        bank.switch(bank.name, bank.lr, trainer.optimizer_args, **trainer.cfg.optimizer_args)
    bank.set_lr(bank.lr)
    trainer.progress = Progress.from_meta(meta)
    trainer.order.restore(meta["data_order"])
    return meta


def digests(trainer) -> tuple[str, str]:
    """(state, slots): the digest of the weights with the step and data order, and of the optimizer's
    variables with its step counter but without its learning rate (an exploit changes the rate,
    not the slots). Equal state, equal digests: how PBT's audit verifies an exploit."""
    where = json.dumps([trainer.progress.step, trainer.order.state()]).encode()
    state = digest((v.numpy() for v in trainer.model.variables), header=where)
    return state, slots_digest(trainer.optimizers.optimizer)
