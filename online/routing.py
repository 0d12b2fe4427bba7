"""The routing table of the A/B flags (``online.experiments`` reloads it): one validated
flags file and the ``LoadedModel`` of every version its running experiments pin. Its meaning
never changes after construction (only a memo of assignments fills in), so a batch that reads
``router.table`` once sees one consistent set of flags and versions; each request's route
names its arm (version and overrides) and the shadows that score a sample of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from online.lifecycle import LoadedModel
from online.settings import DEFAULT_SETTINGS, BatchSettings, batch_settings
from towers.assign import assign
from towers.flags import CURRENT, Experiment, Flags, Overrides


@dataclass(frozen=True, kw_only=True)
class Arm:
    """A (version, overrides) pair: the unit a batch is grouped by."""

    version: str  # CURRENT or a pinned version id
    overrides: Overrides
    key: str  # canonical text of (version, overrides): the grouping key
    # Copied out of ``overrides`` (plain attributes: read once per request on the hot path).
    default_k: int | None = None
    budget_ms: float | None = None
    adjusts_request: bool = False  # default_k or budget_ms set: the router edits the request


@dataclass(frozen=True, kw_only=True)
class Shadow:
    experiment: Experiment
    name: str
    arm: Arm

    @property
    def key(self) -> str:
        return f"{self.experiment.name}/{self.name}"


@dataclass(frozen=True, kw_only=True)
class InterleaveRoute:
    """An interleave experiment's second list: ``other`` serves it (the user's arm with the
    experiment's first variant's settings swapped for the second's); ``names`` credit the teams."""

    experiment: str
    names: tuple[str, str]
    other: Arm


@dataclass(frozen=True, kw_only=True)
class UserRoute:
    """What one user gets under one table: the label for the response and metrics, the
    arm that serves them, and the shadow variants that may score their requests."""

    label: str
    arm: Arm
    shadows: tuple[Shadow, ...] = ()
    interleave: InterleaveRoute | None = None


def _arm_key(version: str, overrides: Overrides) -> str:
    return f"{version}|{overrides.model_dump_json(exclude_none=True)}"


class RoutingTable:
    """One flags file and its resident pinned versions (see the module docstring)."""

    def __init__(self, *, flags: Flags, digest: str, models: Mapping[str, LoadedModel], cache_size: int) -> None:
        self.flags = flags
        self.digest = digest
        self.models = dict(models)  # pinned version -> model
        self._cache_size = cache_size
        self._routes: dict[str, UserRoute] = {}
        self._interned: dict[tuple[str, str, tuple[str, ...]], UserRoute] = {}
        self._arms: dict[str, Arm] = {}
        self._settings: dict[tuple[int, str], BatchSettings] = {}
        self.shadows: dict[str, Shadow] = {
            f"{e.name}/{v.name}": Shadow(experiment=e, name=v.name, arm=self.arm(v.version, v.overrides))
            for e in flags.experiments if e.running for v in e.shadows}

    def arm(self, version: str, overrides: Overrides) -> Arm:
        key = _arm_key(version, overrides)
        a = self._arms.get(key)
        if a is None:
            k, ms = overrides.default_k, overrides.budget_ms
            a = self._arms[key] = Arm(version=version, overrides=overrides, key=key, default_k=k, budget_ms=ms,
                                      adjusts_request=k is not None or ms is not None)
        return a

    def route(self, user_id: str) -> UserRoute:
        """The user's route; ``assign`` (tens of microseconds: two keyed hashes per
        experiment) runs once per user and table, then it is a dict lookup. The memo is
        bounded: when full it starts afresh (assignment is a pure function, so a miss
        only costs time)."""
        r = self._routes.get(user_id)
        if r is not None:
            return r
        a = assign(self.flags, user_id)
        shadows = tuple(f"{x.experiment}/{s}" for x in a.experiments for s in x.shadows)
        arm = self.arm(a.version, a.overrides)
        ikey = (a.label, arm.key, shadows)
        r = self._interned.get(ikey)
        if r is None:
            il = next((x for x in a.experiments if x.interleave is not None), None)  # one at most (flags.sets)
            r = self._interned[ikey] = UserRoute(label=a.label, arm=arm,
                                                 shadows=tuple(self.shadows[s] for s in shadows),
                                                 interleave=self._interleave(il.experiment, a.version, a.overrides)
                                                 if il is not None else None)
        if len(self._routes) >= self._cache_size:
            self._routes.clear()
        if self._cache_size:
            self._routes[user_id] = r
        return r

    def _interleave(self, name: str, version: str, overrides: Overrides) -> InterleaveRoute:
        e = self.flags.experiment(name)
        first, second = e.arms
        # The user's settings with the first variant's replaced by the second's (other
        # experiments' overrides stay: exclusivity keeps them off these keys).
        cleared = overrides.model_copy(update=dict.fromkeys(first.overrides.set_keys()))
        other_version = second.version if "version" in e.sets else version
        return InterleaveRoute(experiment=name, names=(first.name, second.name),
                               other=self.arm(other_version, cleared.merged(second.overrides)))

    def model_for(self, arm: Arm, current: LoadedModel) -> LoadedModel:
        return current if arm.version == CURRENT else self.models[arm.version]

    def settings(self, model: LoadedModel, arm: Arm) -> BatchSettings:
        """The arm's stage settings for ``model`` (FAISS parameters depend on its index)."""
        key = (id(model), arm.key)
        s = self._settings.get(key)
        if s is None:
            s = DEFAULT_SETTINGS if not arm.overrides.set_keys() else batch_settings(arm.overrides,
                                                                                     model.bundle.index_spec)
            self._settings[key] = s
        return s
