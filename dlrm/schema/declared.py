"""A dataset's layout declared in one TOML file: the input, the label and every feature.

Schemas live in ``configs/schemas/`` (``criteo.toml`` is the default of ``dlrm
preprocess``). A file has these tables; every key but the columns has a default::

    [input]
    format = "csv"          # csv, tsv (gzip by the file's .gz extension) or parquet
                            # (columns by name; a list column is a bag)
    delimiter = ","         # default: "," for csv, tab for tsv
    header = true           # the first line names the columns; else list them:
    columns = ["a", "b"]    # every column of a line, in order

    [label]
    column = "click"
    kind = "binary"         # binary (a click) or regression (a number, trained with MSE)
    rule = ""               # binary: "" the field is 0 or 1; ">= 4": 1 where the number
                            # holds it

    ignore = ["id"]         # columns read and dropped (top level, before any table)

    [dense]                 # numeric features
    columns = ["age"]
    fill = 0.0              # the value of an empty field
    transform = "log1p"     # log1p (negatives to 0 first, as Criteo's), none, or
                            # standardize: (x - mean) / std, both of the training sources
                            # (every source but the last; one source: all its rows), kept
                            # in the manifest and applied by the loader
    values = "float"        # float, or integer (anything else is rejected)

    [categorical]           # one embedding table each
    columns = ["user", "genres"]
    values = "auto"         # auto: decimal integers as themselves, any other text hashed
                            # to 64 bits; hex: hexadecimal numbers (Criteo's)
    encoding = "vocab"      # vocab (ids by descending frequency), hash, or managed: raw
                            # ids (hashed to 63 bits) that TorchRec's managed-collision
                            # module maps to rows in training, no counting pass; every
                            # categorical feature or none
    min_frequency = 1       # vocab: rarer values share the out-of-vocabulary id
    max_vocab = 0           # vocab: at most this many values; 0: all
    buckets = 40000000      # hash: ids per feature
    size = 0                # managed: the table's rows (ids admitted at once)
    eviction = "lfu"        # managed: which ids leave a full table: lfu or lru

    [categorical.per_feature.genres]   # any key above, for one column; and for a bag:
    separator = "|"         # the field is a list: a variable-length bag of ids
    max_length = 8          # longer lists are rejected; 0: no cap
    pooling = "mean"        # how the bag's embeddings combine: sum or mean

    [time]                  # optional: the column that orders the rows in time
    column = "hour"
    format = "%y%m%d%H"     # unix (seconds), unix_ms, or a strptime format (UTC); a
                            # Parquet timestamp or date column is read as such
    period = "day"          # hour, day, week or month: the dataset's sources are its
                            # periods, each in time order (see dlrm.schema.periods)

    [[join]]                # optional, repeatable: a side table joined by key (see
    file = "users.csv"      # dlrm.schema.joins); its columns are declared as features
    key = "user_id"
    columns = ["age"]

    [roles]                 # optional: which features describe the user and which the
    user = ["user"]         # item, for `dlrm recommend` (the first item feature is the
    item = ["genres"]       # item's key)

``[dense.per_feature.NAME]`` overrides the dense defaults the same way. Every error names
the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrm.errors import ConfigError, SchemaError
from dlrm.schema.features import DENSE_NAMES, LABEL, SPARSE_NAMES, Features
from dlrm.schema.joins import Join, JoinError, parse_joins
from dlrm.schema.periods import PERIODS
from dlrm.utils.files import read_toml
from dlrm.utils.typed import check_type

SCHEMAS = Path(__file__).resolve().parent.parent.parent / "configs" / "schemas"
FORMATS = ("csv", "tsv", "parquet")


@dataclass(frozen=True)
class Dense:
    name: str
    fill: float = 0.0
    transform: str = "log1p"
    values: str = "float"


@dataclass(frozen=True)
class Categorical:
    name: str
    values: str = "auto"
    encoding: str = "vocab"
    min_frequency: int = 1
    max_vocab: int = 0
    buckets: int = 40_000_000
    size: int = 0
    eviction: str = "lfu"
    separator: str = ""
    max_length: int = 0
    pooling: str = "sum"

    @property
    def multi(self) -> bool:
        """Whether the field holds a list (a bag of ids)."""
        return bool(self.separator)


@dataclass(frozen=True)
class Time:
    column: str
    format: str = "unix"
    period: str = "day"


@dataclass(frozen=True)
class Schema:
    """A declared layout (see the module doc)."""

    name: str
    format: str
    delimiter: str
    header: bool
    columns: tuple[str, ...]  # empty with a header: the header names them
    label: str
    kind: str  # binary or regression
    rule: str
    dense: tuple[Dense, ...]
    categorical: tuple[Categorical, ...]
    ignore: tuple[str, ...]
    time: Time | None = None
    user: tuple[str, ...] = ()  # features that describe the user (recommend)
    item: tuple[str, ...] = ()  # features that describe the item, its key first
    labeled: bool = True  # False: rows to score, without the label column (predict)
    joins: tuple[Join, ...] = ()  # side tables joined onto each row by key

    @property
    def criteo_tsv(self) -> bool:
        """Whether this is Criteo's exact layout (``configs/schemas/criteo.toml``, whatever
        its encoding), which the byte-level fast reader reads and the manifest records as
        Criteo's: TSV without a header, the 40 columns in order, a 0/1 label, 13 integer
        dense features with log1p and fill 0, 26 hex categorical features of one encoding
        for all; no ignored columns, label rule, time column, bags, side tables or roles."""
        first = self.categorical[0]
        return (self.format == "tsv" and self.delimiter == "\t" and not self.header
                and self.columns == (LABEL, *DENSE_NAMES, *SPARSE_NAMES) and not self.ignore
                and self.label == LABEL and self.labeled and self.kind == "binary"
                and not self.rule
                and self.dense == tuple(Dense(n, 0.0, "log1p", "integer") for n in DENSE_NAMES)
                and self.categorical == tuple(dataclasses.replace(first, name=n)
                                              for n in SPARSE_NAMES)
                and first.values == "hex" and not first.multi and first.pooling == "sum"
                and self.time is None and not self.joins and not self.user and not self.item)

    def features(self) -> Features:
        return Features(self.label, tuple(d.name for d in self.dense),
                        tuple(c.name for c in self.categorical),
                        tuple(c.pooling for c in self.categorical), self.kind)

    def used(self) -> list[str]:
        """The columns read from the rows: the label, the dense and categorical features,
        the time, less the columns side tables bring, plus their keys."""
        joined = {c for j in self.joins for c in j.columns}
        names = [*([self.label] if self.labeled else []), *(d.name for d in self.dense),
                 *(c.name for c in self.categorical),
                 *([self.time.column] if self.time else [])]
        keys = [j.key for j in self.joins if j.key not in names]
        return [c for c in names if c not in joined] + list(dict.fromkeys(keys))

    def check_columns(self, names: list[str], where: str) -> None:
        """Every declared column must be among ``names`` (a header), every name declared."""
        used = self.used()
        missing = [c for c in used if c not in names]
        if missing:
            raise SchemaError(f"{where}: no column {', '.join(missing)} (schema {self.name})")
        undeclared = [c for c in names if c not in used and c not in self.ignore]
        if undeclared:
            raise SchemaError(f"{where}: columns {', '.join(undeclared)} are neither features "
                              f"nor in `ignore` of schema {self.name}")

    def to_json(self) -> dict[str, Any]:
        """As JSON holds it (lists, not tuples), so that it compares equal to the copy in
        a run's plan or a dataset's manifest; no ``time`` key without one, as before
        time columns existed."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        for key in ("time", "user", "item", "joins"):  # as before they existed
            if not out[key]:
                del out[key]
        for c in out["categorical"]:  # the managed keys: as before they existed
            if c["encoding"] != "managed":
                del c["size"], c["eviction"]
        if self.labeled:
            del out["labeled"]
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Schema:
        """The schema ``to_json`` wrote (a dataset's manifest keeps it)."""
        time = doc.get("time")
        return cls(**{**doc, "columns": tuple(doc["columns"]), "ignore": tuple(doc["ignore"]),
                      "user": tuple(doc.get("user", ())), "item": tuple(doc.get("item", ())),
                      "dense": tuple(Dense(**d) for d in doc["dense"]),
                      "categorical": tuple(Categorical(**c) for c in doc["categorical"]),
                      "time": Time(**time) if time else None,
                      "joins": tuple(Join.from_json(j) for j in doc.get("joins", ()))})


_OPS = (">=", "<=", "==", "!=", ">", "<")


def parse_rule(rule: str) -> tuple[str, float] | None:
    """``">= 4"`` → (">=", 4.0); ``""`` → None. ValueError for anything else."""
    if not rule.strip():
        return None
    for op in _OPS:
        if rule.strip().startswith(op):
            return op, float(rule.strip()[len(op):])
    raise ValueError(f"expected one of {', '.join(_OPS)} and a number, got {rule!r}")


def _take(table: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    """``table``'s ``key`` (removed from it), else ``default``, checked as the config's
    values are."""
    try:
        return check_type(f"{where}.{key}", table.pop(key, default), kind)
    except ConfigError as e:
        raise SchemaError(str(e)) from None


def _names(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.pop(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SchemaError(f"{where}.{key}: expected a list of column names, got {value!r}")
    return tuple(value)


def _no_more(table: dict[str, Any], where: str) -> None:
    if table:
        raise SchemaError(f"{where}: unknown key {', '.join(sorted(table))}")


def _one_of(value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise SchemaError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")


def _features(doc: dict[str, Any], section: str, cls: type, where: str) -> tuple[Any, ...]:
    """The features of ``[dense]`` or ``[categorical]``: defaults, then per-feature keys."""
    table = dict(doc.pop(section, {}))
    here = f"{where}: {section}"
    columns = _names(table, "columns", here)
    per_feature = table.pop("per_feature", {})
    kinds = {"float": float, "int": int, "str": str}
    fields = {f.name: (kinds[str(f.type)], f.default)
              for f in dataclasses.fields(cls) if f.name != "name"}
    defaults = {key: _take(table, key, kind, default, here)
                for key, (kind, default) in fields.items()}
    _no_more(table, here)
    if not isinstance(per_feature, dict):
        raise SchemaError(f"{here}.per_feature: expected a table per column")
    out = []
    for name in columns:
        values = dict(defaults)
        own = dict(per_feature.pop(name, {}))
        for key, (kind, _) in fields.items():
            values[key] = _take(own, key, kind, values[key], f"{here}.per_feature.{name}")
        _no_more(own, f"{here}.per_feature.{name}")
        out.append(cls(name, **values))
    if per_feature:
        raise SchemaError(f"{here}.per_feature: {', '.join(per_feature)} not in "
                          f"{section}.columns")
    return tuple(out)


def _time(doc: dict[str, Any], where: str) -> Time | None:
    if "time" not in doc:
        return None
    table = doc.pop("time")
    here = f"{where}: time"
    if not isinstance(table, dict):
        raise SchemaError(f"{here}: expected a table")
    table = dict(table)
    column = _take(table, "column", str, "", here)
    fmt = _take(table, "format", str, Time.format, here)
    period = _take(table, "period", str, Time.period, here)
    _no_more(table, here)
    if not column:
        raise SchemaError(f"{here}.column: required")
    _one_of(period, PERIODS, f"{here}.period")
    if not fmt.strip():
        raise SchemaError(f"{here}.format: unix, unix_ms or a strptime format such as "
                          "%Y-%m-%d %H:%M:%S")
    return Time(column, fmt, period)


def load_schema(path: str | Path) -> Schema:
    """Reads and checks a schema file; a name without a path is looked up in
    ``configs/schemas/`` (``avazu`` → ``configs/schemas/avazu.toml``).

    Raises:
        SchemaError: naming the file and the key at fault.
    """
    path = Path(path)
    if not path.is_file() and not path.suffix and (SCHEMAS / f"{path}.toml").is_file():
        path = SCHEMAS / f"{path}.toml"
    doc = read_toml(path, SchemaError, "schema")
    where = str(path)
    inp = dict(doc.pop("input", {}))
    fmt = _take(inp, "format", str, "", f"{where}: input")
    _one_of(fmt, FORMATS, f"{where}: input.format")
    delimiter = _take(inp, "delimiter", str, "\t" if fmt == "tsv" else ",", f"{where}: input")
    if len(delimiter) != 1:
        raise SchemaError(f"{where}: input.delimiter: must be one character, got {delimiter!r}")
    header = _take(inp, "header", bool, False, f"{where}: input")
    columns = _names(inp, "columns", f"{where}: input")
    _no_more(inp, f"{where}: input")
    if fmt != "parquet" and not header and not columns:
        raise SchemaError(f"{where}: input.columns: required without a header")

    label = dict(doc.pop("label", {}))
    label_column = _take(label, "column", str, "", f"{where}: label")
    kind = _take(label, "kind", str, "binary", f"{where}: label")
    rule = _take(label, "rule", str, "", f"{where}: label")
    _no_more(label, f"{where}: label")
    if not label_column:
        raise SchemaError(f"{where}: label.column: required")
    _one_of(kind, ("binary", "regression"), f"{where}: label.kind")
    try:
        parse_rule(rule)
    except ValueError as e:
        raise SchemaError(f"{where}: label.rule: {e}") from None
    if rule and kind == "regression":
        raise SchemaError(f"{where}: label.rule: a regression label is the number itself")
    ignore = _names(doc, "ignore", where)
    time = _time(doc, where)
    dense = _features(doc, "dense", Dense, where)
    categorical = _features(doc, "categorical", Categorical, where)
    try:
        joins = parse_joins(doc.pop("join", []), where, path.parent)
    except JoinError as e:
        raise SchemaError(str(e)) from None
    roles = dict(doc.pop("roles", {}))
    user, item = (_names(roles, r, f"{where}: roles") for r in ("user", "item"))
    _no_more(roles, f"{where}: roles")
    _no_more(doc, where)
    features = [f.name for f in (*dense, *categorical)]
    for role, names in (("user", user), ("item", item)):
        unknown = [n for n in names if n not in features]
        if unknown:
            raise SchemaError(f"{where}: roles.{role}: {', '.join(unknown)} is no feature")
    if set(user) & set(item):
        raise SchemaError(f"{where}: roles: {', '.join(sorted(set(user) & set(item)))} is "
                          "both a user and an item feature")
    if item and item[0] not in [c.name for c in categorical]:
        raise SchemaError(f"{where}: roles.item: the first, the item's key, must be "
                          "categorical")

    for d in dense:
        k = f"{where}: dense.{d.name}"
        _one_of(d.transform, ("log1p", "none", "standardize"), f"{k}.transform")
        _one_of(d.values, ("float", "integer"), f"{k}.values")
    for c in categorical:
        k = f"{where}: categorical.{c.name}"
        _one_of(c.values, ("auto", "hex"), f"{k}.values")
        _one_of(c.encoding, ("vocab", "hash", "managed"), f"{k}.encoding")
        _one_of(c.eviction, ("lfu", "lru"), f"{k}.eviction")
        if c.encoding == "managed" and c.size < 2:
            raise SchemaError(f"{k}.size: a managed table needs its rows, >= 2, got {c.size}")
        _one_of(c.pooling, ("sum", "mean"), f"{k}.pooling")
        for key in ("min_frequency", "max_vocab", "max_length"):
            if getattr(c, key) < 0:
                raise SchemaError(f"{k}.{key}: must be >= 0, got {getattr(c, key)}")
        if c.encoding == "hash" and c.buckets < 2:
            raise SchemaError(f"{k}.buckets: must be >= 2, got {c.buckets}")
        if len(c.separator) > 1 or c.separator == delimiter:
            raise SchemaError(f"{k}.separator: must be one character other than the "
                              f"delimiter, got {c.separator!r}")
    if not categorical:
        raise SchemaError(f"{where}: categorical.columns: at least one is needed")
    managed = [c.name for c in categorical if c.encoding == "managed"]
    if managed and len(managed) != len(categorical):
        raise SchemaError(f"{where}: categorical: encoding managed is for every categorical "
                          f"feature or none (the model holds one collection of tables); "
                          f"managed: {', '.join(managed)}, not: "
                          f"{', '.join(c.name for c in categorical if c.name not in managed)}")
    schema = Schema(path.stem, fmt, delimiter, header, columns, label_column, kind, rule, dense,
                    categorical, ignore, time, user, item, joins=joins)
    features = {label_column, *(f.name for f in (*dense, *categorical))}
    for j in joins:
        loose = [c for c in j.columns if c not in features]
        if loose:
            raise SchemaError(f"{where}: join on {j.key}: {', '.join(loose)} is joined but "
                              "declared as no feature")
    used = schema.used()
    twice = sorted({c for c in used + list(ignore) if (used + list(ignore)).count(c) > 1})
    if twice:
        raise SchemaError(f"{where}: {', '.join(twice)} declared more than once")
    if columns:
        schema.check_columns(list(columns), f"{where}: input.columns")
    return schema
