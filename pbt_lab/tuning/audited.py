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

import uuid
from collections.abc import Iterable

from ray import tune

from pbt_lab.digest import digest
from pbt_lab.names import RESTORED_DIGEST, RESTORED_ID, SAVED_BY_TRIAL, SEGMENT_FROM, STATE_DIGEST, STATE_ID


def saving(arrays: Iterable) -> dict:
    """Report it with the checkpoint of ``arrays`` and keep it in the checkpoint: a new state id, the
    state's digest and the saving trial."""
    return {STATE_ID: uuid.uuid4().hex, STATE_DIGEST: digest(arrays), SAVED_BY_TRIAL: _trial_id()}


def restored(arrays: Iterable, record: dict) -> dict:
    """For the first report after loading ``arrays`` from a checkpoint that kept ``record`` (``saving``'s):
    the saver's state id and trial, and the digest of what was loaded."""
    return {
        RESTORED_ID: record.get(STATE_ID),
        RESTORED_DIGEST: digest(arrays),
        SEGMENT_FROM: record.get(SAVED_BY_TRIAL),
    }


def _trial_id() -> str | None:
    try:
        return tune.get_context().get_trial_id()
    except Exception:  # outside a Tune trial (a unit test): no trial to name
        return None
