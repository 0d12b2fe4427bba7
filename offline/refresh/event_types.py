"""How a dataset spec's event types map the event log to interactions: which types count
(``interactions.event_type.positives``), how training weighs them (``weights``), and which
type a seeded row of a loaded dataset is stored under. The refresh reads them through here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from offline.datasets import Interactions
from offline.interactions import InteractionRows
from towers.spec import DatasetSpec

SEED_TYPE = "rating"  # the event type of the rows a new store is seeded with (CURRENT's dataset)


def interactions_of(rows: InteractionRows, spec: DatasetSpec | None) -> InteractionRows:
    """The rows whose event type the spec counts as an interaction (``event_type.positives``;
    every row when the spec declares no event types or no positives)."""
    et = spec.interactions.event_type if spec is not None else None
    if et is None or et.positives is None:
        return rows
    return rows.take(np.flatnonzero(np.isin(rows.type, np.asarray(et.positives, dtype=str))))


def training_interactions(rows: InteractionRows, spec: DatasetSpec | None) -> Interactions:
    """Rows as training interactions, each weighted by its type (``event_type.weights``; 1 for
    a type the spec does not weigh). No event types in the spec: unweighted, as before."""
    i = rows.to_interactions()
    et = spec.interactions.event_type if spec is not None else None
    if et is None or not et.weights:
        return i
    weight = np.ones(len(rows), np.float32)
    for typ, w in et.weights.items():
        weight[rows.type == typ] = w
    return replace(i, weight=weight)


def seed_types(spec: DatasetSpec, weight: np.ndarray) -> np.ndarray:
    """An event type for each row of a loaded dataset, for seeding the store. The loader keeps
    the rows the spec counts and their weights, not the type column; the mapping reads nothing
    else, so each row is stored under a type of its weight (a weighed type, a positive type,
    or ``SEED_TYPE`` for an unweighed one): the retraining weighs it as the training did."""
    et = spec.interactions.event_type
    assert et is not None
    names = list(dict.fromkeys([*et.weights, *(et.positives or [])]))
    out = np.full(len(weight), SEED_TYPE, dtype=object)
    for w in np.unique(weight).tolist():
        # Compared as stored (float32): 0.2 in the spec is 0.2000000030 in the weight column.
        name = next((t for t in names if np.float32(et.weights.get(t, 1.0)) == np.float32(w)), SEED_TYPE)
        out[weight == w] = name
    return out.astype(str)
