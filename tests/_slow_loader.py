"""Slow the data loader down so that a kill from the test lands mid-epoch."""

import time

from ntksap import data


def slow_down_loader(seconds: float) -> None:
    """Sleep ``seconds`` before each batch of every ``DeviceLoader`` in this process."""
    if not seconds:
        return
    original = data.DeviceLoader.__iter__

    def slow_iter(self):
        for batch in original(self):
            time.sleep(seconds)
            yield batch

    data.DeviceLoader.__iter__ = slow_iter
