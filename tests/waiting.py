"""The one bounded wait the tests share: poll a condition until it holds or a deadline
passes (then fail, naming what was awaited). Never a bare sleep standing in for an event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float = 60.0, what: str = "condition", *, every: float = 0.02) -> T:
    """``cond()``'s first truthy value, polled every ``every`` seconds for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
