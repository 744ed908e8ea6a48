"""A per-worker pixel budget: decodes are admitted only while the pixels in flight fit the budget.

A 195 KB PNG can hold 10000x10000 16-bit pixels; a batch of such files decoded by eight threads at
once would need gigabytes. Each decode first reads its pixel count from the header (no pixels
allocated), then waits here until that many pixels fit under LUNGCAM_DECODE_PIXEL_BUDGET. An image
larger than the whole budget is admitted alone, so it still decodes (peak memory then is that one
image's, which the reduced decoders keep near two integer copies).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class PixelBudget:
    """A counting gate over pixels in flight, shared by a worker's decode threads."""

    def __init__(self, max_pixels: int) -> None:
        """Admit decodes while their pixels in flight sum to at most max_pixels."""
        if max_pixels < 1:
            raise ValueError("the pixel budget must be positive")
        self.max_pixels = max_pixels
        self._in_flight = 0
        self._peak = 0
        self._condition = threading.Condition()

    @property
    def peak(self) -> int:
        """The most pixels ever admitted at once (for tests and metrics)."""
        return self._peak

    @contextmanager
    def admit(self, pixels: int) -> Iterator[None]:
        """Block until `pixels` fit (or nothing else is in flight), hold them for the block, then release."""
        charge = min(max(pixels, 1), self.max_pixels)
        with self._condition:
            self._condition.wait_for(lambda: self._in_flight + charge <= self.max_pixels)
            self._in_flight += charge
            self._peak = max(self._peak, self._in_flight)
        try:
            yield
        finally:
            with self._condition:
                self._in_flight -= charge
                self._condition.notify_all()
