"""The dataset spec: one YAML file that declares a user's own catalog and event log.

It names the interactions table (user, item, time, optional event type with weights,
rating with threshold, group id, context columns), the optional items and users
tables with their feature columns, each feature's kind, and the policies (repeats,
minimum counts, split). The towers, the feature pipeline and serving's context
handling are all built from it, and the resolved spec is saved inside every bundle
(``features.json``), so a bundle never applies another version's features.

Kinds:
    categorical        a vocabulary (values seen ``min_count`` times in train) + hashed OOV buckets
    multi_categorical  a list column, or a string split on ``separator``; pooled (mean or sum)
    numeric            standardised on train (``log``: log1p first); a learned value for missing
    text               hashed lower-cased word tokens (``max_len`` kept), mean-pooled
    bucketized         declared ``edges`` or ``quantiles`` fitted on train; bucket 0 = missing

A context feature may be ``derive``d from the event time instead of read from a column
(``hour_of_day``, ``day_of_week``, UTC): the server derives it from the request's
``Context.timestamp``.

Times (``interactions.time_format``): ``unix`` seconds, ``unix_ms``, ``iso`` (ISO 8601
strings, with or without an offset; naive times are UTC) or a strptime format; a column
stored as a timestamp or date is read as one whatever the format says.

Paths are relative to the spec file; ``{data_dir}`` is the data cache (``--data-dir``).
``atomic: DIR`` reads RecBole atomic files (``NAME.inter``, ``NAME.item``, ``NAME.user``)
whose header types give the kinds; the spec's own sections then override by column
(``drop:`` removes an inferred one).

:func:`parse_spec` / :func:`load_spec` turn pydantic's errors into a ConfigError that names
the file and the dotted field path (``items.features.2.kind``) and, for a feature entry,
its column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from towers.errors import ConfigError

Kind = Literal["categorical", "multi_categorical", "numeric", "text", "bucketized"]
KINDS: tuple[str, ...] = ("categorical", "multi_categorical", "numeric", "text", "bucketized")
Format = Literal["auto", "parquet", "csv", "tsv", "jsonl", "atomic"]
DERIVED = ("hour_of_day", "day_of_week")
RESERVED = ("user", "item")  # the id features' names in the towers' inputs
TIME_FORMATS = ("unix", "unix_ms", "iso")  # or a strptime format (it contains "%")
CONTEXT_KINDS = ("categorical", "bucketized", "numeric")


class SpecFieldError(ValueError):
    """A model-level check that knows which field is wrong (``parse_spec`` puts it in the path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Model):
    """One feature column and how it is encoded."""

    column: str = Field(min_length=1)
    kind: Kind
    name: str | None = None  # the feature's name in the towers (default: the column)
    dim: int | None = Field(default=None, ge=1, le=1024)  # embedding width (default by kind)
    min_count: int = Field(default=1, ge=1)  # categorical / multi_categorical vocabulary cut
    oov_buckets: int = Field(default=1, ge=1, le=1_000_000)  # hashed buckets for unseen values
    max_vocab: int | None = Field(default=None, ge=1)  # keep the most frequent values only
    prefix: int | None = Field(default=None, ge=1)  # categorical: keep the first N characters (zip codes)
    separator: str | None = None  # multi_categorical on a string column (default: whitespace)
    max_len: int = Field(default=16, ge=1, le=512)  # multi_categorical / text: values kept per row
    pooling: Literal["mean", "sum"] = "mean"
    log: bool = False  # numeric: log1p before standardising (prices, counts)
    edges: list[float] | None = None  # bucketized: declared edges, increasing
    quantiles: int | None = Field(default=None, ge=2, le=1000)  # bucketized: buckets fitted on train
    buckets: int = Field(default=4096, ge=1, le=1 << 24)  # text: hash buckets
    derive: Literal["hour_of_day", "day_of_week"] | None = None  # context: from the event time
    missing_values: list[str] = Field(default_factory=list)  # strings that mean "missing" ("n/a", "unknown")

    @property
    def key(self) -> str:
        return self.name or self.column

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        if self.key in RESERVED:
            raise ValueError(f"feature name {self.key!r} is reserved for the id feature (set name: to rename it)")
        if self.kind == "bucketized":
            if self.edges is not None and self.quantiles is not None:
                raise ValueError("bucketized takes edges or quantiles, not both")
            if self.edges is None and self.quantiles is None and self.derive is None:
                raise ValueError("bucketized needs edges (declared) or quantiles (fitted on train)")
            if self.edges is not None and not self.edges:
                raise ValueError("edges must not be empty")
            if self.edges is not None and any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise ValueError("edges must be strictly increasing")
        elif self.edges is not None or self.quantiles is not None:
            raise ValueError(f"edges/quantiles apply to bucketized features, not {self.kind}")
        if self.derive is not None and self.kind not in CONTEXT_KINDS:
            raise ValueError("a derived context feature is categorical, bucketized or numeric")
        return self


def _unique_names(features: list[FeatureSpec]) -> list[FeatureSpec]:
    names = [f.key for f in features]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate feature name {dup[0]!r} (set name: to tell them apart)")
    return features


class EventTypeSpec(_Model):
    column: str = Field(min_length=1)
    weights: dict[str, float] = Field(default_factory=dict)  # training weight per type (default 1)
    positives: list[str] | None = None  # types kept as interactions (default: every type)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not w >= 0 or w == float("inf")]
        if bad:
            raise ValueError(f"weight of {bad[0]!r} must be a finite number >= 0")
        return v

    @field_validator("positives")
    @classmethod
    def _positives(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty list keeps no interaction; leave positives out to keep every type")
        return v


class RatingSpec(_Model):
    column: str = Field(min_length=1)
    threshold: float | None = None  # keep rows with rating >= threshold


class _Source(_Model):
    path: str | None = None  # a file, a directory of Parquet/CSV shards, or a glob
    format: Format = "auto"
    sep: str | None = None  # csv: the delimiter (default ",", tsv: tab)
    encoding: str = "utf-8"


class InteractionsSpec(_Source):
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    # unix (seconds), unix_ms, iso (ISO 8601 / date strings), or a strptime format ("%d/%m/%Y %H:%M")
    time_format: str = "unix"
    event_type: EventTypeSpec | None = None
    rating: RatingSpec | None = None
    group: str | None = None  # order / basket / session id (the repeat-aware protocol's session)
    context: list[FeatureSpec] = Field(default_factory=list)

    @field_validator("time_format")
    @classmethod
    def _time_format(cls, v: str) -> str:
        # "row" is internal: an atomic .inter without a timestamp column is in file order.
        if v not in TIME_FORMATS and v != "row" and "%" not in v:
            raise ValueError(f"{v!r} is not one of {', '.join(TIME_FORMATS)} or a strptime format "
                             "(e.g. \"%Y-%m-%d %H:%M:%S\")")
        return v

    @field_validator("context")
    @classmethod
    def _context(cls, v: list[FeatureSpec]) -> list[FeatureSpec]:
        for f in v:
            if f.kind not in CONTEXT_KINDS:
                raise ValueError(f"context feature {f.key!r} is {f.kind}: context features are "
                                 "categorical, bucketized or numeric")
        return _unique_names(v)


class TableSpec(_Source):
    id: str | None = None  # the id column (default: the interactions' user / item column name)
    title: str | None = None  # items: a display title column (returned by the server)
    features: list[FeatureSpec] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)  # inferred (atomic) features not to use

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[FeatureSpec]) -> list[FeatureSpec]:
        for f in v:
            if f.derive is not None:
                raise ValueError(f"feature {f.key!r}: derive applies to interactions.context only")
        return _unique_names(v)


class IdsSpec(_Model):
    user: bool = True  # the user id embedding (off: a user is their features + history)
    item: bool = True  # the item id embedding (off: a content-only item tower, for cold catalogs)


class Policies(_Model):
    # true: nothing a user interacted with is recommended again (ML-100k); false: past items
    # stay candidates (groceries, music, re-watches); session, cart and explicit exclusions
    # are removed either way.
    exclude_seen: bool = True
    min_user_interactions: int = Field(default=1, ge=1)
    min_item_interactions: int = Field(default=1, ge=1)
    split: Literal["leave_last_out"] = "leave_last_out"  # DESIGN §6, crc32 tie rule
    unknown_context: Literal["reject", "ignore"] = "reject"  # a request's undeclared context key


class DatasetSpec(_Model):
    name: str = Field(min_length=1)
    atomic: str | None = None  # a directory of RecBole atomic files (NAME.inter/.item/.user)
    fetch: Literal["recbole-ml-100k"] | None = None  # download the files first (the shipped ML-100k)
    interactions: InteractionsSpec = Field(default_factory=InteractionsSpec)
    items: TableSpec | None = None
    users: TableSpec | None = None
    ids: IdsSpec = Field(default_factory=IdsSpec)
    policies: Policies = Field(default_factory=Policies)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if self.atomic is None and self.interactions.path is None:
            raise SpecFieldError("interactions.path", "required (or atomic: a directory of RecBole atomic files)")
        for side, table in (("items", self.items), ("users", self.users)):
            if table is not None and table.path is None and self.atomic is None:
                raise SpecFieldError(f"{side}.path", "required (or atomic: a directory of RecBole atomic files)")
        if self.interactions.time_format == "row":
            derived = [f.key for f in self.interactions.context if f.derive is not None]
            if derived:
                raise SpecFieldError("interactions.context", f"{derived[0]!r} is derived from the event time, "
                                     "but the interactions have no time column")
        return self

    # -- helpers ------------------------------------------------------------------------------

    def features(self, side: str) -> list[FeatureSpec]:
        if side == "context":
            return list(self.interactions.context)
        table = self.items if side == "item" else self.users
        return list(table.features) if table is not None else []

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetSpec:
        return parse_spec(d, source="dataset spec")


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def _column_at(data: Any, loc: tuple[Any, ...]) -> str | None:
    """The ``column:`` of the feature entry on the error's path, to name it beside its index."""
    found, node = None, data
    for part in loc:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            if isinstance(node, dict) and isinstance(node.get("column"), str):
                found = node["column"]
        else:
            break
    return found


def parse_spec(data: Any, *, source: str) -> DatasetSpec:
    """Validate a parsed YAML/JSON document; a ConfigError names the file and the dotted
    field path (``items.features.2.kind``), plus the feature's column where there is one."""
    if not isinstance(data, dict):
        raise ConfigError(source, "a dataset spec is a mapping (name:, interactions:, items:, ...)")
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        err = errors[0]
        loc = tuple(err["loc"])
        where = _loc(loc)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecFieldError):
            where = ".".join(p for p in (where, cause.field) if p)
        msg = str(err["msg"]).removeprefix("Value error, ")
        column = _column_at(data, loc)
        if column is not None:
            msg += f" (column {column!r})"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {where or 'spec'}", msg + more) from None


def load_spec(path: Path) -> DatasetSpec:
    """Read a spec file (YAML)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "dataset spec not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read the dataset spec: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {e}") from None
    return parse_spec(data, source=str(path))
