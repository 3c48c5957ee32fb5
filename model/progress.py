"""Progress lines of long reads and writes of checkpoints (model/checkpoint.py loads with it,
model/random_checkpoint.py writes with it)."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("model.checkpoint")


class Progress:
    """Logs a progress line at most every 2 s over `total` tensors read or written (sizes in
    bytes, logged in GB), then a summary."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.count, self.bytes = total, what, 0, 0
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= 2.0:
            self.last = now
            bar = "#" * int(20 * self.count / self.total)
            log.info("%s [%-20s] %d/%d, %.2f GB, %.1f s", self.what, bar, self.count,
                     self.total, self.bytes / 1e9, now - self.start)

    def done(self) -> None:
        log.info("%s: done, %.2f GB in %.1f s", self.what, self.bytes / 1e9,
                 time.monotonic() - self.start)
