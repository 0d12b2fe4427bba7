"""A/B experiment flags: the YAML file's schema, validated once at the edge.

The schema lives in ``towers/`` because the online server (which version and
settings a request gets) and the offline refresh job (which versions must keep
their Redis keys) both read it; ``towers/`` imports neither of them.

    experiments:
      - name: ranker-v2
        salt: "ranker-v2-2026-11"
        status: running            # running | paused | stopped
        allocation: 1.0            # share of users in the experiment (10,000 hash buckets)
        variants:                  # the FIRST variant is the control
          - {name: control, weight: 0.5, version: CURRENT}
          - {name: treatment, weight: 0.5, version: v20261201T030000-abc, overrides: {nprobe: 64}}
          - {name: shadow-hnsw, shadow: 0.1, version: v20261201T040000-def}
        force: {"qa-user-1": treatment}

Decisions (each one is checked here or in ``towers.assign``):

- **Control** is the first variant, so the file reads like the analysis (the
  baseline first) and no marker can be forgotten or duplicated; it cannot be a
  shadow. Weights of the non-shadow variants sum to 1 (tolerance 1e-6).
- **Ramp layout**: the control takes whatever buckets the treatments leave, and
  every treatment's bucket range depends only on its own weight and its place
  in the list, so raising one treatment only takes buckets from the control
  (``ramp_layout``). With three or more treatments that needs capacity limits
  (see ``ramp_layout``); a file that exceeds them is refused.
- **Status**: ``paused`` and ``stopped`` both send everyone (forced users too)
  to the default, i.e. CURRENT with no overrides; they differ only for humans
  (paused means "will resume with the same salt, hence the same users").
  Versions of non-running experiments are not pinned (need not be resident).
- **Overlapping experiments**: an experiment *sets* the parameters its arms
  change (``version`` when an arm pins one other than CURRENT, plus every
  override key). Experiments that set disjoint parameters overlap freely on
  their independent salts; experiments that set a common parameter are mutually
  exclusive: a user taken by one (allocated or forced) is ``excluded`` from the
  later ones in file order, so a served response never mixes two experiments'
  values for one setting and each experiment's control stays clean.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from towers.bundle_paths import VERSION_RE
from towers.errors import ConfigError

N_BUCKETS = 10_000
CURRENT = "CURRENT"
WEIGHT_TOLERANCE = 1e-6
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # names end up in metric labels
RUNGS = ("full", "no_session", "batch", "popularity")
Status = Literal["running", "paused", "stopped"]
INTERLEAVE = "interleave"  # the pseudo-parameter interleave experiments share (mutual exclusion)
Rung = Literal["full", "no_session", "batch", "popularity"]


def _invalid(field: str, message: str) -> PydanticCustomError:
    """A cross-field error: ``field`` is relative to the model that raises it."""
    return PydanticCustomError("flags", "{field}: {message}", {"field": field, "message": message})


class _Model(BaseModel):
    # strict: YAML's ``true`` is not an nprobe and ``2026`` is not a salt.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Overrides(_Model):
    """Serving settings a variant changes; unset (None) means "the server's own"."""

    nprobe: int | None = Field(default=None, ge=1, le=65_536)
    ef_search: int | None = Field(default=None, ge=1, le=65_536)
    max_session: int | None = Field(default=None, ge=0, le=1_000)  # session events the combiner reads
    budget_ms: float | None = Field(default=None, gt=0, le=60_000)
    allowed_rungs: list[Rung] | None = None
    default_k: int | None = Field(default=None, ge=1, le=1_000)  # the server still caps it at its max_k

    @field_validator("allowed_rungs")
    @classmethod
    def _ladder_ends_in_popularity(cls, v: list[str] | None) -> list[str] | None:
        # An RPC fails only for bad input (DESIGN §3): the ladder must keep the rung that cannot fail.
        if v is not None:
            if len(set(v)) != len(v):
                raise _invalid("", f"{v!r} lists a rung twice")
            if "popularity" not in v:
                raise _invalid("", f"{v!r} must include 'popularity', the rung that cannot fail")
        return v

    def set_keys(self) -> frozenset[str]:
        """The settings this object sets."""
        return frozenset(k for k in type(self).model_fields if getattr(self, k) is not None)

    def merged(self, other: Overrides) -> Overrides:
        """``self`` with ``other``'s set values on top."""
        return self.model_copy(update={k: getattr(other, k) for k in other.set_keys()})


class Variant(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    weight: float | None = Field(default=None, ge=0, le=1)
    shadow: float | None = Field(default=None, gt=0, le=1)  # share of the experiment's requests scored off-path
    version: str = CURRENT
    overrides: Overrides = Field(default_factory=Overrides)

    @field_validator("version")
    @classmethod
    def _version_id(cls, v: str) -> str:
        if v != CURRENT and not VERSION_RE.fullmatch(v):
            raise _invalid("", f"{v!r} is neither CURRENT nor a registry version id (v<YYYYMMDD>T<HHMMSS>-<hex>)")
        return v

    @model_validator(mode="after")
    def _weight_xor_shadow(self) -> Variant:
        if self.shadow is not None and self.weight is not None:
            raise _invalid("weight", f"{self.weight!r} given, but a shadow variant takes no traffic")
        if self.shadow is None and self.weight is None:
            raise _invalid("weight", "missing: a variant needs a weight (or a shadow rate)")
        return self

    @property
    def is_shadow(self) -> bool:
        return self.shadow is not None


def ramp_layout(counts: Sequence[int], *, n_buckets: int = N_BUCKETS) -> list[tuple[int, int]]:
    """Bucket ranges ``[lo, hi)`` of the treatments, given their sizes in buckets;
    the control owns every bucket outside them.

    Raising one treatment must take buckets from the control only, never from
    another treatment, so a range may depend on nothing but its own size and its
    place in the list. Two treatments fit in one slot with no limit: the first
    grows from the slot's top downward, the second from its bottom upward, and
    they meet only when the control is empty. A third cannot (it would need a
    third free edge), so k treatments get ceil(k/2) equal slots, two per slot,
    and a pair's sizes must fit its slot. Adding, removing or reordering
    treatments changes the layout (a new design, not a ramp).
    """
    n_slots = max(1, (len(counts) + 1) // 2)
    ranges = []
    for i, c in enumerate(counts):
        lo, hi = (i // 2) * n_buckets // n_slots, (i // 2 + 1) * n_buckets // n_slots
        ranges.append((hi - c, hi) if i % 2 == 0 else (lo, lo + c))
    return ranges


class Experiment(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    salt: str = Field(min_length=1, max_length=256)
    status: Status
    # "ab": each user is served one arm. "interleave": each allocated user's requests are
    # answered with a team-draft interleaving of the two arms' lists (``towers.interleave``);
    # the weights must still sum to 1 but decide nothing (everyone allocated gets both).
    kind: Literal["ab", "interleave"] = "ab"
    allocation: float = Field(ge=0, le=1)
    variants: list[Variant] = Field(min_length=1)
    force: dict[str, str] = Field(default_factory=dict)  # user id -> variant name, for QA

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        seen: set[str] = set()
        for v in self.variants:
            if v.name in seen:
                raise _invalid(f"variants[{v.name}].name", f"{v.name!r} is used twice")
            seen.add(v.name)
        if self.variants[0].is_shadow:
            raise _invalid(f"variants[{self.variants[0].name}].shadow",
                           f"{self.variants[0].shadow!r}: the first variant is the control and cannot be a shadow")
        total = sum(v.weight or 0.0 for v in self.arms)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise _invalid("variants", f"weights {[v.weight for v in self.arms]} sum to {total:g}, not 1")
        counts = self.treatment_buckets()
        n_slots = max(1, (len(counts) + 1) // 2)
        for s in range(n_slots):
            pair = self.treatments[2 * s:2 * s + 2]
            size = (s + 1) * N_BUCKETS // n_slots - s * N_BUCKETS // n_slots
            if sum(counts[2 * s:2 * s + 2]) > size:
                names = " + ".join(f"{v.name} {v.weight:g}" for v in pair)
                raise _invalid(f"variants[{pair[0].name}].weight",
                               f"{names} exceed their ramp slot ({size / N_BUCKETS:g} of the buckets; "
                               f"{len(counts)} treatments share {n_slots} slots, see ramp_layout)")
        if self.kind == "interleave":
            if len(self.arms) != 2:
                raise _invalid("variants", f"interleaving merges exactly two variants, not {len(self.arms)}")
            if self.shadows:
                raise _invalid(f"variants[{self.shadows[0].name}].shadow", "an interleave experiment has no shadows")
        for user, target in self.force.items():
            if target not in seen:
                raise _invalid(f"force[{user}]", f"{target!r} is not a variant of {self.name}")
            if self.variant(target).is_shadow:
                raise _invalid(f"force[{user}]", f"{target!r} is a shadow variant; users cannot be forced into it")
        return self

    @property
    def control(self) -> Variant:
        return self.variants[0]

    @cached_property
    def arms(self) -> list[Variant]:
        """The variants that take traffic (control first)."""
        return [v for v in self.variants if not v.is_shadow]

    @cached_property
    def treatments(self) -> list[Variant]:
        return self.arms[1:]

    @cached_property
    def shadows(self) -> list[Variant]:
        return [v for v in self.variants if v.is_shadow]

    @property
    def running(self) -> bool:
        return self.status == "running"

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def treatment_buckets(self) -> list[int]:
        return [round((v.weight or 0.0) * N_BUCKETS) for v in self.treatments]

    @cached_property
    def treatment_ranges(self) -> list[tuple[int, int]]:
        return ramp_layout(self.treatment_buckets())

    @cached_property
    def allocated_buckets(self) -> int:
        return round(self.allocation * N_BUCKETS)

    @cached_property
    def sets(self) -> frozenset[str]:
        """The serving parameters this experiment varies (the unit of mutual exclusion)."""
        keys: set[str] = set()
        for v in self.arms:
            if v.version != CURRENT:
                keys.add("version")
            keys |= v.overrides.set_keys()
        if self.kind == "interleave":
            keys.add(INTERLEAVE)  # a user is in one interleaving at most (a response merges two lists)
        return frozenset(keys)


class Flags(_Model):
    experiments: list[Experiment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Flags:
        names: set[str] = set()
        salts: dict[str, str] = {}
        for e in self.experiments:
            if e.name in names:
                raise _invalid(f"experiments[{e.name}].name", f"{e.name!r} is used twice")
            names.add(e.name)
            if e.salt in salts:
                # A shared salt would put the same users in the same buckets of both experiments.
                raise _invalid(f"experiments[{e.name}].salt", f"{e.salt!r} is already the salt of {salts[e.salt]}")
            salts[e.salt] = e.name
        for i, b in enumerate(self.experiments):
            for a in self.experiments[:i]:
                common = sorted(set(a.force) & set(b.force))
                if common and self.exclusive(a, b):
                    raise _invalid(f"experiments[{b.name}].force[{common[0]}]",
                                   f"{common[0]!r} is also forced into {a.name}, which sets the same "
                                   f"parameters ({', '.join(sorted(a.sets & b.sets))})")
        return self

    @staticmethod
    def exclusive(a: Experiment, b: Experiment) -> bool:
        """Whether two experiments set a common parameter (so no user is in both)."""
        return bool(a.sets & b.sets)

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        raise KeyError(name)

    def pinned_versions(self) -> frozenset[str]:
        """Every version a running experiment serves or shadows, CURRENT excluded: what
        the server keeps resident and the refresh job must not clean up."""
        return frozenset(v.version for e in self.experiments if e.running for v in e.variants
                         if v.version != CURRENT)

    def retained_versions(self) -> frozenset[str]:
        """Every version a running or paused experiment names, CURRENT excluded: what the
        registry and Redis must keep (a paused experiment resumes with the same arms)."""
        return frozenset(v.version for e in self.experiments if e.status != "stopped" for v in e.variants
                         if v.version != CURRENT)


# -- loading -------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a flags file must not."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, (str, int, float, bool)):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _path(loc: Sequence[int | str], data: Any) -> str:
    """``('experiments', 0, 'variants', 1, 'weight')`` -> ``experiments[ranker-v2].variants[treatment].weight``:
    list items are named by their ``name`` in the file, map entries by their key."""
    out, node, in_map = "", data, False
    for key in loc:
        child = None
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            child = node[key]
            name = child.get("name") if isinstance(child, dict) else None
            out += f"[{name}]" if isinstance(name, str) else f"[{key}]"
        elif in_map:
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
            child = node.get(key) if isinstance(node, dict) else None
        in_map = key == "force"
        node = child
    return out


_OPS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
        "less_than": ("lt", "<")}


def _message(err: Any) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind in _OPS:
        key, op = _OPS[kind]
        return f"{_short(value)} is not {op} {ctx[key]:g}"
    if kind == "extra_forbidden":
        return f"unknown key (value {_short(value)})"
    if kind == "missing":
        return "missing"
    if kind == "literal_error":
        return f"{_short(value)} is not one of {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return f"{_short(value)} is not a valid name (letters, digits, '.', '_', '-'; at most 64)"
    return f"{_short(value)}: {err['msg'][0].lower()}{err['msg'][1:]}"


def _config_error(exc: ValidationError, data: Any) -> ConfigError:
    problems = []
    for err in exc.errors():
        path = _path(err["loc"], data)
        if err["type"] == "flags":
            sub = err["ctx"]["field"]
            field = f"{path}.{sub}" if path and sub and not sub.startswith("[") else f"{path}{sub}"
            problems.append((field or "flags", err["ctx"]["message"]))
        else:
            problems.append((path or "flags", _message(err)))
    field, message = problems[0]
    rest = "".join(f"; {f}: {m}" for f, m in problems[1:])
    return ConfigError(field, message + rest)


def parse_flags(data: Any) -> Flags:
    """Validate already-parsed YAML/JSON data; ConfigError names experiment, field and value."""
    if not isinstance(data, dict):
        raise ConfigError("flags", f"expected a mapping with an 'experiments' list, got {_short(data)}")
    try:
        return Flags.model_validate(data)
    except ValidationError as e:
        raise _config_error(e, data) from None


def load_flags(path: Path) -> Flags:
    """Read and validate a flags file. Every problem is a ConfigError: the caller (CLI,
    hot reload) keeps what it had and shows the message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "flags file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read the flags file ({e})") from None
    return parse_flags_text(text, source=str(path))


def parse_flags_text(text: str, *, source: str) -> Flags:
    """Validate a flags file's text (``source`` names it in errors). The server's hot reload
    reads the file once and hashes and parses the same bytes, so the digest it reports is
    the content it serves."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(source, f"not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        raise ConfigError(source, "the flags file is empty (expected 'experiments: [...]')")
    return parse_flags(data)
