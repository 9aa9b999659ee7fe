"""Criteo's layout is one declared schema, ``configs/schemas/criteo.toml``: the byte-level
fast reader is chosen because a schema's contents are Criteo's exact layout
(``Schema.criteo_tsv``), not because no schema was given. A schema that differs from it in
one way (a header line; one categorical feature fewer) reads through the declared reader,
and both make the same rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import quiet, read_units

from dlrm.preprocess.driver import preprocess
from dlrm.rows import layout as layout_module
from dlrm.rows.chunks import Options, plan_tasks
from dlrm.rows.inputs import layout_of
from dlrm.schema.declared import SCHEMAS, load_schema
from dlrm.schema.features import SPARSE_NAMES, TSV_COLUMNS
from dlrm.synth.criteo import synth

CRITEO_TOML = (SCHEMAS / "criteo.toml").read_text()


def _variant(tmp: Path, name: str) -> Path:
    """criteo.toml changed in one way: ``header`` (the files start with a line naming the
    columns) or ``fewer`` (C26 ignored: one categorical feature fewer)."""
    if name == "header":
        text = CRITEO_TOML.replace("header = false", "header = true")
    else:
        text = 'ignore = ["C26"]\n' + CRITEO_TOML.replace('"C25", "C26"]\nvalues', '"C25"]\nvalues')
    assert text != CRITEO_TOML
    path = tmp / f"criteo_{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, list[Path]]:
    """Criteo day files as they are, and the same rows after a header line."""
    root = tmp_path_factory.mktemp("criteo_schema")
    synth(root / "plain", days=2, rows_per_day=3000, seed=11)
    plain = [root / "plain" / f"day_{d}" for d in range(2)]
    with open(plain[1], "a") as f:  # bad lines, so that both readers' rejects are seen
        f.write("x\t1\n" + "\t".join(["1"] * 14 + ["zz"] + ["1"] * 25) + "\n")  # C1: no hex
    (root / "header").mkdir()
    headed = []
    for p in plain:
        headed.append(root / "header" / p.name)
        headed[-1].write_bytes("\t".join(TSV_COLUMNS).encode() + b"\n" + p.read_bytes())
    return {"plain": plain, "header": headed}


def _reader(layout, path: Path, monkeypatch) -> str:
    """The reader ``layout`` parses ``path`` with: the fast path or the declared one."""
    called = []
    for reader in ("criteo_blocks", "declared_blocks"):
        monkeypatch.setattr(layout_module, reader,
                            lambda *a, _name=reader, **k: called.append(_name) or iter(()))
    layout.blocks(plan_tasks([path], 1 << 20)[0], Options(), lambda n: None)
    monkeypatch.undo()
    (name,) = called
    return {"criteo_blocks": "criteo_tsv", "declared_blocks": "declared"}[name]


def test_the_fast_path_is_chosen_by_the_schemas_contents(raw, tmp_path, monkeypatch):
    criteo = load_schema("criteo")
    assert criteo.criteo_tsv
    layout = layout_of(criteo, None, raw["plain"])
    assert layout.criteo_tsv and layout.schema == criteo
    assert _reader(layout, raw["plain"][0], monkeypatch) == "criteo_tsv"
    # The same contents under another file name, and another encoding for all: still it.
    copy = tmp_path / "my_logs.toml"
    copy.write_text(CRITEO_TOML)
    assert load_schema(copy).criteo_tsv
    assert dataclasses.replace(criteo, categorical=tuple(
        dataclasses.replace(c, encoding="hash", buckets=1000) for c in criteo.categorical)
    ).criteo_tsv
    for name in ("header", "fewer"):
        schema = load_schema(_variant(tmp_path, name))
        assert not schema.criteo_tsv, name
        inputs = raw["header" if name == "header" else "plain"]
        other = layout_of(schema, None, inputs)
        assert not other.criteo_tsv
        assert _reader(other, inputs[0], monkeypatch) == "declared"
    # Other ways of differing: one categorical's encoding, a bag, the columns' order, a
    # label rule, roles (which the manifest's declaration must keep).
    first = criteo.categorical[0]
    for changed in (
        dataclasses.replace(criteo, categorical=(dataclasses.replace(first, min_frequency=2),
                                                 *criteo.categorical[1:])),
        dataclasses.replace(criteo, categorical=(dataclasses.replace(first, separator="|"),
                                                 *criteo.categorical[1:])),
        dataclasses.replace(criteo, columns=criteo.columns[::-1]),
        dataclasses.replace(criteo, rule=">= 1"),
        dataclasses.replace(criteo, user=("C1",), item=("C2",)),
    ):
        assert not changed.criteo_tsv


@pytest.mark.parametrize("name", ["header", "fewer"])
def test_a_schema_one_way_off_criteos_makes_the_same_rows(raw, tmp_path, name):
    fast = preprocess(raw["plain"], tmp_path / "fast", workers=1, log=quiet,
                      options=Options(chunk_bytes=1 << 16))
    schema = load_schema(_variant(tmp_path, name))
    inputs = raw["header" if name == "header" else "plain"]
    declared = preprocess(inputs, tmp_path / "declared", workers=1, log=quiet, schema=schema,
                          options=Options(chunk_bytes=1 << 16))
    # Recorded as Criteo's always was (one encoding for all, no declaration), or declared.
    assert "declared" not in fast.schema and fast.encoding["type"] == "vocab"
    assert declared.schema["declared"] == schema.to_json()
    assert set(declared.encoding) == {c.name for c in schema.categorical}
    keep = list(SPARSE_NAMES) if name == "header" else list(SPARSE_NAMES[:-1])
    assert declared.schema["sparse"] == keep
    assert declared.cardinalities == fast.cardinalities[:len(keep)]
    for key in ("rows_accepted", "rows_rejected"):
        assert getattr(declared, key) == getattr(fast, key) > 0
    assert fast.rows_rejected == 2
    rows = read_units(tmp_path / "fast", fast.sources)
    got = read_units(tmp_path / "declared", declared.sources)
    want = rows.drop_columns([c for c in rows.column_names if c not in got.column_names])
    assert got.num_rows == fast.rows_accepted
    assert got.schema == want.schema
    for column in got.column_names:  # the same numbers, the same ids, column by column
        assert got.column(column).equals(want.column(column)), column
