"""Where one process's seconds go, by part: measured, never inferred.

    clock = PartClock(born_at=process_start_time)
    with clock.part("train"):
        ...                      # its seconds count to "train"
        with clock.part("validate"):
            ...                  # nested: these count to "validate" only
    clock.take()                 # {part: seconds} since the last take, and start afresh

Every second from ``born_at`` on lands in exactly one part: the time inside a part is exclusive of
the parts nested in it, and the time between the outermost calls (when the process is back in
Ray's hands) counts to the part the next call names as its ``gap`` (``ray`` unless it says
otherwise). So the parts of every ``take()`` add up to the seconds since the one before.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from pbt_lab.names import ACTOR_START, RAY


class PartClock:
    """Seconds per part since the last ``take()``; see the module doc."""

    def __init__(self, born_at: float | None = None, first_gap: str = ACTOR_START):
        now = time.time()
        self.born_at = now if born_at is None else min(born_at, now)
        self._seconds: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [part, since]: the innermost one is running
        self._left_at = self.born_at  # when the outermost part last ended
        self._first_gap = first_gap  # what the time before the first call counts to

    @contextmanager
    def part(self, name: str, gap: str = RAY) -> Iterator[None]:
        """Count the seconds inside to ``name``; entered from outside every part, the seconds since
        the last one ended count to ``gap`` (the process's start before its first call)."""
        now = time.time()
        if self._open:
            self._charge_innermost(now)
        else:
            self._seconds[self._first_gap or gap] += now - self._left_at
            self._first_gap = None
        self._open.append([name, now])
        try:
            yield
        finally:
            end = time.time()
            self._charge_innermost(end)
            self._open.pop()
            if self._open:
                self._open[-1][1] = end  # the enclosing part runs again from here
            else:
                self._left_at = end

    def _charge_innermost(self, now: float) -> None:
        innermost = self._open[-1]
        self._seconds[innermost[0]] += now - innermost[1]
        innermost[1] = now

    def take(self) -> dict[str, float]:
        """The seconds per part since the last take (open parts counted up to now), then zero."""
        if self._open:
            self._charge_innermost(time.time())
        taken, self._seconds = dict(self._seconds), defaultdict(float)
        return taken
