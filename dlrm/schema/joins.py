"""Side tables joined onto each row by key (a schema's ``[[join]]``): a user table, an item
table, so that a log and its tables go in as they are::

    [[join]]
    file = "users.csv"        # relative to the schema file's folder; csv, tsv or parquet
    key = "user_id"           # a column of the rows and of the table
    columns = ["gender", "age", "occupation", "zip"]   # the table's columns to join
    # format = "csv"          # default: by the file's suffix
    # delimiter = "|"         # default: "," for csv, tab for tsv
    # header = false          # then name every column of a line:
    # names = ["user_id", "gender", "age", "occupation", "zip"]

The joined columns are then declared as features like any other. A row whose key the table
lacks gets missing values for the table's columns (counted in the manifest); a key twice
in a table is an error naming the file and the line. Keys match as text, surrounding
spaces trimmed. Reading the tables and joining them is ``dlrm.rows.joins``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrm.errors import PreprocessError

JOIN_FORMATS = ("csv", "tsv", "parquet")


class JoinError(PreprocessError):
    """A side table that cannot be joined; names the file, and the line where one is at
    fault."""


@dataclass(frozen=True)
class Join:
    file: str  # absolute; a model directory's own is relative to it (see ``based``)
    key: str
    columns: tuple[str, ...]
    format: str = "csv"
    delimiter: str = ","
    header: bool = True
    names: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Join:
        return cls(**{**doc, "columns": tuple(doc["columns"]), "names": tuple(doc["names"])})


def parse_joins(entries: Any, where: str, base: Path) -> tuple[Join, ...]:
    """The ``[[join]]`` tables of a schema file (``base``: its folder)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise JoinError(f"{where}: join: expected [[join]] tables")
    joins = []
    for i, entry in enumerate(entries):
        at = f"{where}: join[{i}]"
        e = dict(entry)
        unknown = [k for k in e if k not in ("file", "key", "columns", "format", "delimiter",
                                             "header", "names")]
        if unknown:
            raise JoinError(f"{at}: unknown key {', '.join(unknown)}")
        for key in ("file", "key"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise JoinError(f"{at}.{key}: required, a string")
        columns, names = e.get("columns", []), e.get("names", [])
        for key, value in (("columns", columns), ("names", names)):
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise JoinError(f"{at}.{key}: expected a list of column names")
        if not columns:
            raise JoinError(f"{at}.columns: name the table's columns to join")
        if e["key"] in columns:
            raise JoinError(f"{at}.columns: {e['key']} is the key")
        path = Path(e["file"]).expanduser()
        path = path if path.is_absolute() else (base / path)
        fmt = e.get("format") or ("parquet" if path.suffix == ".parquet" else
                                  "tsv" if path.suffix in (".tsv", ".txt") else "csv")
        if fmt not in JOIN_FORMATS:
            raise JoinError(f"{at}.format: must be one of {', '.join(JOIN_FORMATS)}, got {fmt!r}")
        delimiter = e.get("delimiter") or ("\t" if fmt == "tsv" else ",")
        header = e.get("header", True)
        if not isinstance(header, bool) or len(delimiter) != 1:
            raise JoinError(f"{at}: header must be true or false, delimiter one character")
        if not header and fmt != "parquet" and not names:
            raise JoinError(f"{at}.names: required without a header")
        joins.append(Join(str(path.resolve()), e["key"], tuple(columns), fmt, delimiter, header,
                          tuple(names)))
    seen: list[str] = []
    for j in joins:
        twice = [c for c in j.columns if c in seen]
        if twice:
            raise JoinError(f"{where}: join: {', '.join(twice)} joined from two tables")
        seen += j.columns
    return tuple(joins)


def based(joins: tuple[Join, ...], base: Path) -> tuple[Join, ...]:
    """Joins whose relative files (a model directory's) are taken under ``base``."""
    return tuple(j if Path(j.file).is_absolute() else
                 Join(**{**j.__dict__, "file": str(base / j.file)}) for j in joins)
