"""Resumable runs: a directory per run with one checkpoint per finished step.

A nightly refresh is a chain of long steps (consume the event log, embed, index, batch-score,
evaluate, publish, acknowledge). When the process dies half way, the next attempt should not
redo the hours already spent, and must not redo a step whose side effect is already out in
the world. So each step, once it returns, records its result in ``steps/<name>.json``
(written atomically: the checkpoint is there whole or not at all); running the same step
again in the same run returns the recorded result without calling it::

    RUN/
      run.json           run id, start time, parameters, the times it was resumed
      steps/<name>.json  one per finished step: its result (a JSON object) and timings

Semantics a step author must know: a step is skipped once its checkpoint exists, so its side
effect happens once *after* the checkpoint. A crash inside a step (before its checkpoint) runs
the step again on resume: steps are at least once, so their side effects must be idempotent
(write to a path named by the run, ``SET`` rather than ``INCR``, publish an immutable version).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from towers.bundle import atomic_write_bytes as write_bytes_atomic
from towers.bundle import fsync_dir
from towers.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STATE_FILE = "run.json"
STEPS_DIR = "steps"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable run state ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    """Sortable by start time (UTC), unique across hosts by a random suffix."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class RunDir:
    """One run's directory. Build with :meth:`create` (a new run) or :meth:`open` (resume)."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self.state = state

    @property
    def run_id(self) -> str:
        return str(self.state["run_id"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.state.get("params", {}))

    @classmethod
    def create(cls, root: Path, *, run_id: str | None = None, params: dict[str, Any] | None = None) -> RunDir:
        """A new run under ``root/<run_id>``; ``params`` (JSON-able) are recorded so a resumed
        attempt can run with the same ones. An existing run id is refused (resume it with
        :meth:`open` instead of mixing two runs' checkpoints)."""
        run_id = run_id or new_run_id()
        if not _NAME.match(run_id):
            raise ConfigError("run_id", f"{run_id!r} must be letters, digits, '_', '-' or '.'")
        state = {"run_id": run_id, "started": _now_iso(), "started_unix": time.time(), "params": params or {},
                 "resumed": []}
        try:
            payload = json.dumps(state, indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as e:
            raise ConfigError("params", f"not JSON-serializable: {e}") from e
        root.mkdir(parents=True, exist_ok=True)
        path = root / run_id
        try:
            path.mkdir()
        except FileExistsError as e:
            raise ConfigError("run_id", f"run {run_id!r} already exists in {root}; open it to resume") from e
        (path / STEPS_DIR).mkdir()
        write_bytes_atomic(path / STATE_FILE, payload.encode())
        fsync_dir(root)
        return cls(path, state)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """Resume an existing run: its finished steps will be skipped. The resume is recorded."""
        try:
            state = _read_json(path / STATE_FILE)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a run directory (no {STATE_FILE})") from e
        if "run_id" not in state:
            raise DataError(f"{path / STATE_FILE}: no run_id")
        state.setdefault("resumed", []).append(_now_iso())
        (path / STEPS_DIR).mkdir(exist_ok=True)
        write_json_atomic(path / STATE_FILE, state)
        return cls(path, state)

    # -- steps -------------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ConfigError("step", f"{name!r} must be letters, digits, '_', '-' or '.' (a file name)")
        return self.path / STEPS_DIR / f"{name}.json"

    def _load(self, name: str) -> dict[str, Any] | None:
        try:
            return _read_json(self._checkpoint(name))
        except FileNotFoundError:
            return None

    def done(self, name: str) -> bool:
        return self._checkpoint(name).is_file()

    def result(self, name: str) -> dict[str, Any] | None:
        """The recorded result of a finished step, None if it has not finished."""
        cp = self._load(name)
        return None if cp is None else dict(cp["result"])

    def run_step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` unless the step already finished in this run; either way return its result.

        The result must be a JSON object: it is what a later attempt gets back instead of
        running the step again, so everything the following steps need (paths, versions,
        counts) belongs in it."""
        cp = self._load(name)
        if cp is not None:
            log.info("run %s: step %s finished in an earlier attempt; skipping", self.run_id, name)
            return dict(cp["result"])
        started, t0 = _now_iso(), time.perf_counter()
        result = fn()
        duration = time.perf_counter() - t0
        if not isinstance(result, dict):
            raise DataError(f"step {name!r} returned {type(result).__name__}, expected a dict (its checkpoint)")
        seq = sum(1 for p in (self.path / STEPS_DIR).glob("*.json") if not p.name.startswith("."))
        record = {"name": name, "seq": seq, "result": result, "started": started, "finished": _now_iso(),
                  "duration_s": round(duration, 6)}
        try:
            payload = json.dumps(record, indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as e:
            raise DataError(f"step {name!r}: result is not JSON-serializable ({e})") from e
        write_bytes_atomic(self._checkpoint(name), payload.encode())
        log.info("run %s: step %s done in %.3fs", self.run_id, name, duration)
        # Round-trip through JSON so a first attempt and a resumed one see the same values.
        return dict(json.loads(payload)["result"])

    def report(self) -> dict[str, Any]:
        """The run so far: its state and every finished step in the order it finished, with
        timings (a resumed run reports the steps of all its attempts)."""
        steps = []
        for p in (self.path / STEPS_DIR).glob("*.json"):
            if not p.name.startswith("."):
                steps.append(_read_json(p))
        steps.sort(key=lambda s: (int(s.get("seq", 0)), str(s.get("finished", ""))))
        return {"run_id": self.run_id, "started": self.state.get("started"), "params": self.params,
                "resumed": list(self.state.get("resumed", [])),
                "steps": [{k: s.get(k) for k in ("name", "result", "started", "finished", "duration_s")}
                          for s in steps],
                "total_step_s": round(sum(float(s.get("duration_s", 0.0)) for s in steps), 6)}
