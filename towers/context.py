"""Request-time context as the combiner reads it: numpy only, one place for training's
export check, ``twotower evaluate`` and the server.

The dataset spec declares the context features (``interactions.context``); the pipeline's
``context_encoders`` encode them (``FeaturePipeline.context_features``: a derived feature,
``hour_of_day`` / ``day_of_week``, from the event or request time). The combiner adds one
learned d-dim vector per feature to the query (``towers.combiner``)::

    categorical, bucketized   x (B,) int64          c += table[x]              table (rows, d)
    numeric                   x (B, 2) [z, missing]  c += z * w + missing * m   table (2, d) = [w; m]

The tables start at zero (``towers.model.SessionCombiner``), so a model that learned
nothing from context ranks like one without it.

Where the values come from: in training and evaluation, the interaction row's own context
columns and timestamp; at serving, ``Context.values`` by feature name (``Context.device``
stands for ``values["device"]``) and ``Context.timestamp`` (0: the server's clock).
:class:`ContextSchema` is what a bundle lets a request carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from towers.combiner import CombinerParams
from towers.errors import InvalidRequest
from towers.features import FeaturePipeline

DEVICE = "device"  # the feature the legacy ``Context.device`` field feeds


def table_shape(kind: str, rows: int, dim: int) -> tuple[int, int]:
    """The combiner array a context feature of ``kind`` needs (``rows``: its encoder's table_rows)."""
    return (2, dim) if kind == "numeric" else (max(rows, 1), dim)


def check(fp: FeaturePipeline, p: CombinerParams) -> None:
    """The combiner holds exactly one array per declared context feature, of the shape the
    fitted encoder needs (a lookup past a table's end must be impossible). ValueError else."""
    problems = []
    declared = {e.name for e in fp.context_encoders}
    for e in fp.context_encoders:
        want = table_shape(e.kind, e.table_rows, p.dim)
        got = p.context.get(e.name)
        if got is None:
            problems.append(f"no context array for the declared context feature {e.name!r}")
        elif got.shape != want:
            problems.append(f"context array {e.name!r} has shape {got.shape}, the pipeline needs {want}")
    problems += [f"context array {k!r} for a feature the spec does not declare"
                 for k in sorted(set(p.context) - declared)]
    if problems:
        raise ValueError("combiner: " + "; ".join(problems))


def context_term(p: CombinerParams, encoded: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """(B, d) float32: the sum of the combiner's context vectors for encoded context
    (``FeaturePipeline.context_features``); None when there is no context feature. The
    encoding's shape says the kind: (B,) rows of a table, (B, 2) a numeric [z, missing]."""
    if not encoded:
        return None
    out: np.ndarray | None = None
    for name, x in encoded.items():
        table = p.context.get(name)
        if table is None:
            raise ValueError(f"the combiner has no context array for feature {name!r}")
        v = table[x] if x.ndim == 1 else x[:, 0:1] * table[0] + x[:, 1:2] * table[1]
        out = v if out is None else out + v
    assert out is not None
    return out.astype(np.float32, copy=False)


def encode_requests(fp: FeaturePipeline, values: Sequence[Mapping[str, str] | None], timestamps: np.ndarray,
                    devices: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Encoded context of B requests: ``values`` by feature name (None: no values),
    ``timestamps`` unix seconds, ``devices`` the legacy ``Context.device`` ("" = unset).
    Keys no declared feature reads are not looked at (validation is ``ContextSchema.check``)."""
    n = len(values)
    columns: dict[str, list[str | None]] = {}
    for e in fp.context_encoders:
        if e.spec.derive is not None:
            continue
        col: list[str | None] = [v.get(e.name) if v else None for v in values]
        if e.name == DEVICE and devices is not None:
            col = [c if c is not None else (d or None) for c, d in zip(col, devices, strict=True)]
        columns[e.name] = col
    return fp.context_features(columns, np.asarray(timestamps, dtype=np.int64).reshape(n))


def request_term(fp: FeaturePipeline, p: CombinerParams, values: Sequence[Mapping[str, str] | None],
                 timestamps: np.ndarray, devices: Sequence[str] | None = None) -> np.ndarray | None:
    """The (B, d) context term of B requests (None when the spec declares no context)."""
    if not fp.context_encoders:
        return None
    return context_term(p, encode_requests(fp, values, timestamps, devices))


@dataclass(frozen=True)
class ContextSchema:
    """What a bundle's spec lets a request's ``Context.values`` carry."""

    settable: frozenset[str]  # declared context features read from the request
    derived: Mapping[str, str]  # declared, computed from Context.timestamp: name -> derive kind
    ignore_unknown: bool  # policies.unknown_context == "ignore"

    @classmethod
    def of(cls, fp: FeaturePipeline) -> ContextSchema:
        encs = fp.context_encoders
        policy = fp.spec.get("policies", {}).get("unknown_context", "reject")
        return cls(settable=frozenset(e.name for e in encs if e.spec.derive is None),
                   derived={e.name: e.spec.derive for e in encs if e.spec.derive is not None},
                   ignore_unknown=policy == "ignore")

    def check(self, values: Mapping[str, str] | None) -> None:
        """InvalidRequest naming ``context.values[KEY]`` for a key the model cannot read."""
        for key in values or ():
            if key in self.settable:
                continue
            field = f"context.values[{key}]"
            if key in self.derived:
                raise InvalidRequest(field, f"{key!r} is derived ({self.derived[key]}) from context.timestamp; "
                                     "send the timestamp instead")
            if not self.ignore_unknown:
                known = ", ".join(sorted(self.settable)) or "none"
                raise InvalidRequest(field, f"{key!r} is not a context feature of this model's dataset spec "
                                     f"(declared: {known}; policies.unknown_context: ignore accepts and "
                                     "drops undeclared keys)")
