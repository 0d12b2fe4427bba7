"""Which variant of each experiment a user gets: a pure function of (flags, user id).

Every worker, replica and restart must give a user the same answer, so the
bucket is a keyed blake2b of (salt, purpose, user id), never Python's ``hash()``
(randomised per process). Two buckets per user and experiment, from independent
hashes (the purpose differs): one decides *whether* the user is in the
experiment (``allocation``), the other *which* variant. With one shared hash, a
partial allocation is a band of buckets and the variant ranges cut that band
unevenly: Unleash's PHP client saw visibly skewed splits under gradual rollout
from exactly that (PR #179).

The rules (see ``towers.flags`` for the reasons):

1. An experiment that is not running gives everyone the default (``not-running``).
2. Forced users get their variant (``forced``), before anything else.
3. Otherwise, in file order, a user already taken by an earlier experiment
   that sets a common parameter is ``excluded``; else a user whose allocation
   bucket is past ``allocation * 10,000`` is ``outside-allocation``; else the
   variant bucket picks the variant through ``flags.ramp_layout`` (``allocated``).

Raising ``allocation`` only adds users (their variant bucket is unchanged), and
raising a treatment's weight only moves users into it from the control.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from towers.flags import CURRENT, N_BUCKETS, Experiment, Flags, Overrides

Reason = Literal["forced", "allocated", "outside-allocation", "not-running", "excluded"]
DEFAULT = "default"  # the label of a user in no variant: CURRENT, no overrides
# The variant label of a user allocated to an interleave experiment: served both arms merged
# (the first arm's version and overrides run the primary search; ``interleave`` names both).
INTERLEAVED = "interleaved"
_NO_OVERRIDES = Overrides()


def bucket(*, salt: str, purpose: str, key: str, n_buckets: int = N_BUCKETS) -> int:
    """A uniform bucket in ``[0, n_buckets)``, the same in every process. The salt is
    length-prefixed so no (salt, purpose) pair can imitate another; the modulo bias of
    a 64-bit digest over 10,000 buckets is below 1e-15."""
    data = f"{len(salt)}:{salt}|{purpose}|{key}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % n_buckets


def allocation_bucket(experiment: Experiment, user_id: str) -> int:
    return bucket(salt=experiment.salt, purpose="allocation", key=user_id)


def variant_bucket(experiment: Experiment, user_id: str) -> int:
    return bucket(salt=experiment.salt, purpose="variant", key=user_id)


def variant_for_bucket(experiment: Experiment, b: int) -> str:
    """The arm that owns variant bucket ``b``: a treatment's range, else the control."""
    for variant, (lo, hi) in zip(experiment.treatments, experiment.treatment_ranges, strict=True):
        if lo <= b < hi:
            return variant.name
    return experiment.control.name


def shadow_sampled(experiment: Experiment, shadow: str, *, request_id: str) -> bool:
    """Whether a request is scored by a shadow variant: a per-request hash (its own
    purpose, so independent of the assignment) below the shadow's rate."""
    rate = experiment.variant(shadow).shadow or 0.0
    return bucket(salt=experiment.salt, purpose=f"shadow:{shadow}", key=request_id) < round(rate * N_BUCKETS)


@dataclass(frozen=True, kw_only=True)
class ExperimentAssignment:
    """One experiment's answer for one user. ``variant`` is None for the default."""

    experiment: str
    variant: str | None
    reason: Reason
    allocation_bucket: int
    variant_bucket: int
    version: str = CURRENT  # what this experiment serves the user
    overrides: Overrides = field(default_factory=Overrides)
    shadows: tuple[str, ...] = ()  # shadow variants that may score this user's requests
    excluded_by: str | None = None
    interleave: tuple[str, str] | None = None  # kind interleave, allocated: the two variants merged

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "variant": self.variant, "reason": self.reason,
                "allocation_bucket": self.allocation_bucket, "variant_bucket": self.variant_bucket,
                "version": self.version, "overrides": self.overrides.model_dump(exclude_none=True),
                "shadows": list(self.shadows), "excluded_by": self.excluded_by,
                "interleave": list(self.interleave) if self.interleave else None}


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """A user's answers from every experiment, and what the server should do with them:
    one version and one set of overrides (exclusivity guarantees no two experiments
    set the same one)."""

    user_id: str
    experiments: tuple[ExperimentAssignment, ...]
    version: str
    overrides: Overrides

    def of(self, experiment: str) -> ExperimentAssignment:
        for a in self.experiments:
            if a.experiment == experiment:
                return a
        raise KeyError(experiment)

    @property
    def label(self) -> str:
        """The response's variant field and metrics label: ``exp=variant,...`` or ``default``."""
        parts = [f"{a.experiment}={a.variant}" for a in self.experiments if a.variant is not None]
        return ",".join(parts) or DEFAULT

    def to_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "version": self.version, "label": self.label,
                "overrides": self.overrides.model_dump(exclude_none=True),
                "experiments": [a.to_json() for a in self.experiments]}


def assign(flags: Flags, user_id: str) -> Assignment:
    """Assign ``user_id`` in every experiment of ``flags`` (rules in the module docstring)."""
    answers: dict[str, ExperimentAssignment] = {}
    taken: dict[str, str] = {}  # parameter -> the experiment that sets it for this user

    def place(e: Experiment, variant: str | None, reason: Reason, excluded_by: str | None = None) -> None:
        # Interleaving: an allocated user gets both arms (a forced one, for QA, the arm forced).
        both = e.kind == "interleave" and reason == "allocated"
        if both:
            variant = e.control.name
        v = e.variant(variant) if variant is not None else None
        answers[e.name] = ExperimentAssignment(
            experiment=e.name, variant=INTERLEAVED if both else variant, reason=reason, excluded_by=excluded_by,
            interleave=(e.arms[0].name, e.arms[1].name) if both else None,
            allocation_bucket=allocation_bucket(e, user_id), variant_bucket=variant_bucket(e, user_id),
            version=v.version if v is not None else CURRENT,
            overrides=v.overrides if v is not None else _NO_OVERRIDES,
            shadows=tuple(s.name for s in e.shadows) if v is not None else ())
        if v is not None:
            taken.update(dict.fromkeys(e.sets, e.name))

    for e in flags.experiments:  # forced users first: QA must see what it asked for
        if e.running and user_id in e.force:
            place(e, e.force[user_id], "forced")
    for e in flags.experiments:
        if e.name in answers:
            continue
        if not e.running:
            place(e, None, "not-running")
            continue
        clash = sorted({taken[p] for p in e.sets if p in taken})
        if clash:
            place(e, None, "excluded", excluded_by=clash[0])
        elif allocation_bucket(e, user_id) >= e.allocated_buckets:
            place(e, None, "outside-allocation")
        else:
            place(e, variant_for_bucket(e, variant_bucket(e, user_id)), "allocated")

    ordered = tuple(answers[e.name] for e in flags.experiments)
    overrides, version = _NO_OVERRIDES, CURRENT
    for a in ordered:
        if a.variant is not None:
            # Exclusivity means no two assigned experiments set the same key, so order does not matter.
            overrides = overrides.merged(a.overrides) if a.overrides.set_keys() else overrides
            version = a.version if a.version != CURRENT else version
    return Assignment(user_id=user_id, experiments=ordered, version=version, overrides=overrides)
