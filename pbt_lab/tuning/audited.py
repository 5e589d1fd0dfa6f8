"""Every restore audited on any Ray trainable: what it reports when it saves and after it restores.

    from pbt_lab import audited

    record = audited.saving(arrays)               # before writing a checkpoint of ``arrays``
    json.dump(record, open(os.path.join(d, "audited.json"), "w"))   # ...kept in the checkpoint
    tune.report({**metrics, **record}, checkpoint=...)

    record = json.load(open(os.path.join(d, "audited.json")))       # after loading a checkpoint
    next_report |= audited.restored(arrays, record)                  # ...in the first report after it

``arrays`` is the state, in a fixed order (weights, optimizer slots, step: anything NumPy reads). The
saver reports the digest of what it saved; the restorer the digest of what it loaded, with the saver's
state id and trial. ``python -m pbt_lab.results RUN_DIR`` then audits every restore of the run
(``results/audit.py``'s ``audit_digests``): the same state id with another digest is ``mismatched``, an
id no saver reported ``unverifiable``, and an exploit is matched to LabPBT's decision.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

import numpy as np
from ray import tune

from pbt_lab.names import RESTORED_ID, RESTORED_SHA256, SAVED_BY_TRIAL, SEGMENT_FROM, STATE_ID, STATE_SHA256


def digest(arrays: Iterable) -> str:
    """SHA-256 of ``arrays`` in order: each one's dtype, shape and bytes."""
    sha = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        sha.update(f"{a.dtype.str}{a.shape}".encode())
        sha.update(a)
    return sha.hexdigest()


def saving(arrays: Iterable) -> dict:
    """Report it with the checkpoint of ``arrays`` and keep it in the checkpoint: a new state id, the
    state's digest and the saving trial."""
    return {STATE_ID: uuid.uuid4().hex, STATE_SHA256: digest(arrays), SAVED_BY_TRIAL: _trial_id()}


def restored(arrays: Iterable, record: dict) -> dict:
    """For the first report after loading ``arrays`` from a checkpoint that kept ``record`` (``saving``'s):
    the saver's state id and trial, and the digest of what was loaded."""
    return {
        RESTORED_ID: record.get(STATE_ID),
        RESTORED_SHA256: digest(arrays),
        SEGMENT_FROM: record.get(SAVED_BY_TRIAL),
    }


def _trial_id() -> str | None:
    try:
        return tune.get_context().get_trial_id()
    except Exception:  # outside a Tune trial (a unit test): no trial to name
        return None
