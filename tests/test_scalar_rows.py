"""The serving fast path (``ScalarRows``: a few rows converted value by value) against the
vectorised path (``RequestRows.convert``, ``encode``, ``table_rows``), on random rows full
of odd values: it takes exactly the batches the vectorised path takes whole, and gives
their rows the same dense values (bit for bit) and ids."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dlrm.data.batches import table_rows
from dlrm.rows.codecs import category_values
from dlrm.rows.encode import encode
from dlrm.rows.layout import Layout
from dlrm.rows.vocab import Encoder, save_tables
from dlrm.schema.declared import load_schema
from dlrm.serve.request_rows import RequestRows, RowsError
from dlrm.serve.scalar_rows import ScalarRows

ROOT = Path(__file__).resolve().parent.parent

DECLARED = """
ignore = ["note"]

[input]
format = "csv"
header = true
columns = ["rating", "n1", "n2", "n3", "user", "item", "tags", "code", "h", "note"]

[label]
column = "rating"
rule = ">= 4"

[dense]
columns = ["n1", "n2", "n3"]
transform = "none"

[dense.per_feature.n1]
transform = "log1p"

[dense.per_feature.n2]
transform = "standardize"

[dense.per_feature.n3]
values = "integer"
fill = -1.0

[categorical]
columns = ["user", "item", "tags", "code", "h"]
encoding = "vocab"

[categorical.per_feature.tags]
separator = "|"
max_length = 4

[categorical.per_feature.code]
values = "hex"

[categorical.per_feature.h]
encoding = "hash"
buckets = 1000
"""

NUMBERS = ["", "0", "-3", "12", "007", "1.5", " 2.5 ", "\t3\n", "1e3", "-2E-2", ".5", "5.",
           "+7", "1e400", "-1e400", "123456789012345678", "1234567890123456789", "-",
           "--1", "abc", "1.2.3", "nan", "inf", "\v1", "\u0663", "0x10", "\uff11",
           "1_000", "1 2", "e5"]
AUTO = ["", "0", "-0", "007", "42", "-42", "9223372036854775807", "-9223372036854775808",
        "123456789012345678", "-123456789012345678", "1234567890123456789", "abc", "x y",
        "\u00fcn\u00efcode", "a" * 63, "b" * 64, "c" * 65, "d" * 200, " 5", "5 ", "5-",
        "+5", "1.0", "\u0663"]
HEX = ["", "0", "ff", "FF", "deadbeef", "DeadBeef", "12345678", "0123456789abcdef",
       "0123456789abcdef0", "xyz", "-1", " ff", "g"]
LABELS = ["", "0", "1", "4", "5", "4.5", "x", " 4 ", "1e1", "-1"]


def _vocab(values: list[str], kind: str) -> np.ndarray:
    text = pa.array([v.encode() for v in values if v], pa.binary())
    parsed, present, valid = category_values(text, kind)
    return np.unique(parsed[present & valid])


def _setup(schema, tmp_path: Path, pools: dict[str, list[str]], standardize=()):
    layout = Layout.declared(schema)
    vocabs = {c.name: _vocab(pools[c.name], c.values) for c in schema.categorical
              if c.encoding == "vocab"}
    for name in list(vocabs):  # some values of each pool stay out: OOV
        vocabs[name] = vocabs[name][: max(1, vocabs[name].size * 2 // 3)]
    save_tables(vocabs, tmp_path / "tables")
    encoder = Encoder(layout.sparse, layout.encodings, str(tmp_path / "tables"))
    features = dataclasses.replace(schema.features(), standardize=standardize)
    rows = RequestRows(schema)
    return rows, layout, encoder, features, ScalarRows(rows, encoder, features)


JSON_ODD = [None, 7, -7, 0, 2.0, 2.5, float(2**60), 1e300, True, 10**20, -2**63, 2**64,
            ["a", "b"], ["x", 7, None], [], {"a": 1}]


def _shaped(rng: random.Random, rows: list[dict], columns: list[str], label: str) -> list:
    """Rows as a client may send them: objects or lists in column order, with or without
    the label."""
    out = []
    for row in rows:
        if rng.random() < 0.3:
            row = {c: v for c, v in row.items() if c != label}
        out.append(row if rng.random() < 0.5 else [row[c] for c in columns if c in row])
    return out


def _check(setup, good: dict[str, list], odd: dict[str, list], seed: int, trials: int,
           label: str) -> int:
    """Compares the two paths on random batches of good values, then on every odd value
    (and every JSON value that is no string) alone in a good batch, in each column of
    ``odd``; returns how many batches the vectorised path took whole."""
    rng = random.Random(seed)
    columns = setup[0].columns
    new_row = lambda: {c: rng.choice(good[c]) for c in columns}  # noqa: E731
    batches = [[new_row() for _ in range(rng.randint(1, 8))] for _ in range(trials)]
    for c, pool in odd.items():
        for v in [*pool, *JSON_ODD]:
            batch = [new_row() for _ in range(rng.randint(1, 4))]
            batch[rng.randrange(len(batch))][c] = v
            batches.append(batch)
    return sum(_compare(*setup, _shaped(rng, b, columns, label)) for b in batches)


def _compare(rows, layout, encoder, features, scalar, batch) -> bool:
    """Whether the vectorised path took the whole batch; asserts the fast path agrees."""
    try:
        fields = rows.fields(batch)
    except RowsError:
        return False
    block, reasons = rows.convert(fields)
    fast = scalar.rows(fields)
    if (reasons >= 0).any():
        assert fast is None, (batch, reasons)
        return False
    assert fast is not None, batch
    want = table_rows(encode(block, encoder, layout), features, layout.multi, "input")
    np.testing.assert_array_equal(fast.dense.view(np.int32), want.dense.view(np.int32))
    assert fast.dense.dtype == want.dense.dtype == np.float32
    for name, got, expected in zip(features.sparse, fast.sparse, want.sparse, strict=True):
        if isinstance(expected, np.ndarray):
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            assert got.to_pylist() == expected.to_pylist(), name
    return True


def test_declared_rows_of_odd_values_convert_alike(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text(DECLARED)
    schema = load_schema(path)
    tags = ["", "a", "b|c", "||a|", "7|-0|x", "q|r|s|t", "x|" + "y" * 70]
    odd = {"rating": LABELS, "n1": NUMBERS, "n3": NUMBERS, "user": AUTO,
           "tags": [*tags, "a|b|c|d|e", "|".join(AUTO[1:5])], "code": HEX, "h": AUTO}
    floats = NUMBERS[:16]
    good = {"rating": ["0", "1", "4", "5", "4.5", " 4 "], "n1": floats, "n2": floats,
            "n3": ["", "0", "-3", "12", "007", "123456789012345678"], "user": AUTO,
            "item": AUTO, "tags": tags, "code": HEX[:8], "h": AUTO, "note": AUTO}
    setup = _setup(schema, tmp_path, {**good, "tags": AUTO + ["a", "b", "c", "x"]},
                   standardize=(("n2", 1.25, 3.5),))
    taken = _check(setup, good, odd, seed=0, trials=300, label="rating")
    assert taken > 300  # the good batches and the odd values the codecs take


@pytest.mark.parametrize("seed", [1, 2])
def test_criteo_rows_convert_alike(tmp_path, seed):
    schema = load_schema(ROOT / "configs" / "schemas" / "criteo.toml")
    rng = random.Random(seed)
    hexes = [f"{rng.getrandbits(32):08x}" for _ in range(40)]
    good = {"label": ["0", "1"]}
    good.update({d.name: ["", "0", "-3", "12", "007", "123456789012345678"]
                 for d in schema.dense})
    good.update({c.name: ["", *hexes] for c in schema.categorical})
    setup = _setup(schema, tmp_path, {**good, **{c.name: hexes + HEX
                                                 for c in schema.categorical}})
    odd = {"label": LABELS, "I1": NUMBERS, "I13": NUMBERS, "C1": HEX, "C26": HEX}
    taken = _check(setup, good, odd, seed=seed, trials=150, label="label")
    assert taken > 150
