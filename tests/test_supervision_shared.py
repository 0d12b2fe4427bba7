"""The swap turn workers of one supervisor share, and the state a supervisor shows them."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from online.supervision_shared import SharedSupervision, SwapTurn


def _taken(turn: SwapTurn) -> bool:
    async def take() -> bool:
        async with turn.turn() as held:
            return held

    return asyncio.run(take())


def test_the_turn_is_exclusive_gives_up_after_its_bound_and_survives_a_killed_holder(tmp_path: Path) -> None:
    path = tmp_path / "swap.lock"
    turn = SwapTurn(path, poll_s=0.01, max_wait_s=0.05)
    assert _taken(turn)  # free: taken at once, and released on exit
    other = FileLock(str(path), thread_local=False)
    other.acquire()
    try:
        assert not _taken(turn)  # held elsewhere: gave up after max_wait_s (the swap goes ahead anyway)
    finally:
        other.release()
    assert _taken(turn)
    # A worker killed while holding the turn must not stall every later swap: flock goes with
    # the dead process's file descriptor.
    script = (f"import time\nfrom filelock import FileLock\nlock = FileLock({str(path)!r})\nlock.acquire()\n"
              "print('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not _taken(turn)
    finally:
        holder.kill()
        holder.wait()
    assert _taken(turn)


def test_the_supervisors_state_reads_back_as_published() -> None:
    shared = SharedSupervision(mp.get_context("spawn"))
    assert shared.snapshot() == {"workers": 0, "restarts": 0, "failed_starts": 0, "crash_loop": False,
                                 "restart_backoff_s": 0.0}
    shared.publish(workers=3, restarts=2, crash_loop=True, restart_backoff_s=0.5)
    assert shared.snapshot() == {"workers": 3, "restarts": 2, "failed_starts": 0, "crash_loop": True,
                                 "restart_backoff_s": 0.5}
