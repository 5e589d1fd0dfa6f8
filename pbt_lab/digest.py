"""The digest every audit compares: xxh3_128 (xxhash) of a header and arrays, each with its dtype and shape.

Taken at every check a checkpoint may follow and at every restore, so its speed is a turn's: SHA-256 of a
quarter-width model's 10 MB cost 5.6 ms, xxh3_128 0.2 ms. It detects a wrong, stale or damaged state (a
bug, a race, a bad disk), which is what the audit is for; it is not a signature against a forger.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash


def digest(arrays: Iterable, header: bytes = b"") -> str:
    """The digest of ``header`` and then each of ``arrays`` in order: its dtype, shape and bytes."""
    h = xxhash.xxh3_128(header)
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a)  # the array's own buffer: no copy to bytes
    return h.hexdigest()
