"""The typed manifest: read and checked once (format, every field present with its type),
old manifests read as before, and a real dataset's manifest read back field for field."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from helpers import ML_HEADER, movielens_rows, quiet, write_csv

from dlrm.errors import ExportError, PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.schema.declared import load_schema
from dlrm.schema.features import Features
from dlrm.schema.manifest import FORMAT, MANIFEST, DatasetEncoding, Manifest, load_manifest
from dlrm.schema.splits import default_split_specs


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Manifest]:
    """A declared layout with a time column (periods), vocab encoded; what preprocess
    returned."""
    root = tmp_path_factory.mktemp("ml")
    # 2000-12-31 00:00 UTC on, one a minute: two periods (months)
    write_csv(root / "ratings.csv", ML_HEADER, movielens_rows(3000, 0, start=978_220_800))
    return root / "data", preprocess([root / "ratings.csv"], root / "data", log=quiet,
                                     schema=load_schema("movielens"))


@pytest.fixture()
def movielens(made) -> Path:
    return made[0]


@pytest.fixture()
def doc(small_dataset) -> dict:
    """A real manifest's document, to be edited."""
    return json.loads((small_dataset / MANIFEST).read_text())


def _dataset(tmp_path: Path, doc: dict) -> Path:
    out = tmp_path / "edited"
    out.mkdir(exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(doc))
    return out


def _refused(tmp_path: Path, doc: dict, *words: str) -> str:
    """load_manifest's PreprocessError for ``doc``; it names the file and each word."""
    data = _dataset(tmp_path, doc)
    with pytest.raises(PreprocessError) as e:
        load_manifest(data)
    message = str(e.value)
    assert message.startswith(f"{data / MANIFEST}: "), message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------ real datasets


@pytest.mark.parametrize("which", ["criteo", "movielens"])
def test_a_real_manifest_reads_back_field_for_field(which, small_dataset, movielens):
    data = small_dataset if which == "criteo" else movielens
    text = (data / MANIFEST).read_text()
    raw = json.loads(text)
    m = load_manifest(data)
    assert isinstance(m, Manifest) and m.path == data and m.format == FORMAT
    for key, value in raw.items():
        assert getattr(m, key) == value, key
    # Nothing lost, nothing added: the document again, byte for byte as written.
    assert m.to_json() == raw
    assert json.dumps(m.to_json(), indent=1) + "\n" == text
    assert m.features == Features.from_schema(raw["schema"])
    assert m.units == raw["periods" if "periods" in raw else "sources"]
    assert m.unit_kind == ("periods" if "periods" in raw else "sources")
    assert m.files == [f for u in m.units for f in u["files"]]
    assert m.declared == raw["schema"].get("declared")
    assert m.standardize == raw["schema"].get("standardize", {})
    assert m.has_vocab
    assert load_manifest(data) == m


def test_the_criteo_and_declared_manifests_hold_what_each_layout_records(small_dataset,
                                                                        movielens):
    criteo, ml = load_manifest(small_dataset), load_manifest(movielens)
    assert criteo.periods is None and criteo.declared is None and criteo.like is None
    assert criteo.vocab_from is not None and criteo.oov_rate is not None
    assert len(ml.periods) == 2 and ml.declared is not None
    assert [p["name"] for p in ml.units] == [p["name"] for p in ml.periods]
    assert default_split_specs(ml)["train"] == [p["name"] for p in ml.periods][:-1]


def test_preprocess_returns_the_manifest_it_wrote(made):
    data, returned = made
    assert returned == load_manifest(data)
    again = preprocess([data.parent / "ratings.csv"], data, log=quiet,
                       schema=load_schema("movielens"))  # a rerun: nothing to do
    assert again == returned


# ------------------------------------------------------------------ refused


@pytest.mark.parametrize("fmt", ["dlrm-criteo-parquet/2", None, 1])
def test_an_unknown_format_is_refused_naming_the_file(doc, tmp_path, fmt):
    if fmt is None:
        del doc["format"]
    else:
        doc["format"] = fmt
    message = _refused(tmp_path, doc, "unknown format", FORMAT)
    assert repr(fmt) in message


def test_a_manifest_that_is_no_object_is_refused(tmp_path):
    _refused(tmp_path, [FORMAT], "corrupt manifest")


@pytest.mark.parametrize("key", ["schema", "encoding", "cardinalities", "sources",
                                 "rows_accepted", "rows_rejected", "rejected_by_reason"])
def test_a_missing_required_key_is_refused_naming_the_file_and_key(doc, tmp_path, key):
    del doc[key]
    _refused(tmp_path, doc, f"no {key!r}")


@pytest.mark.parametrize("path, key", [
    (("schema", "sparse"), "'schema.sparse'"),
    (("schema", "label"), "'schema.label'"),
    (("sources", 1, "name"), "'sources[1].name'"),
    (("sources", 0, "files"), "'sources[0].files'"),
    (("sources", 2, "files", 0, "rows"), "'sources[2].files[0].rows'"),
])
def test_a_missing_nested_key_is_refused_naming_it(doc, tmp_path, path, key):
    *parents, last = path
    part = doc
    for p in parents:
        part = part[p]
    del part[last]
    _refused(tmp_path, doc, f"no {key}")


@pytest.mark.parametrize("path, value, want", [
    (("rows_accepted",), "12000", "an integer"),
    (("rows_accepted",), True, "an integer"),
    (("rows_rejected",), 1.5, "an integer"),
    (("cardinalities",), ["5"] * 26, "a list of integers"),
    (("cardinalities",), 26, "a list of integers"),
    (("rejected_by_reason",), {"bad_label": "1"}, "an object of integers"),
    (("encoding",), "vocab", "an object"),
    (("sources",), {}, "a list of objects"),
    (("seconds",), "1.5", "a number"),
    (("oov_rate",), {"C1": None}, "an object of numbers"),
    (("like",), "elsewhere", "an object"),
    (("schema", "dense"), "I1", "a list of strings"),
    (("schema", "pooling"), [1], "a list of strings"),
    (("sources", 0, "rows_accepted"), "4000", "an integer"),
    (("sources", 0, "files", 0, "path"), 7, "a string"),
    (("sources", 0, "files", 0, "bytes"), "1", "an integer"),
])
def test_a_wrong_typed_key_is_refused_naming_the_file_and_key(doc, tmp_path, path, value,
                                                              want):
    *parents, last = path
    part = doc
    for p in parents:
        part = part[p]
    part[last] = value
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    _refused(tmp_path, doc, f"{key!r}: expected {want}, got")


def test_a_stored_model_keeps_the_encoding_blocks_and_names_its_file(doc, tmp_path):
    where = tmp_path / "model.json"
    blocks = {k: doc[k] for k in ("format", "schema", "encoding", "cardinalities")}
    enc = DatasetEncoding.from_json(copy.deepcopy(blocks), where, ExportError, "dataset.")
    assert enc.encoding_json() == blocks and enc.features == load_manifest(
        _dataset(tmp_path, doc)).features
    del blocks["cardinalities"]
    with pytest.raises(ExportError, match=re.escape(f"{where}: no 'dataset.cardinalities'")):
        DatasetEncoding.from_json(blocks, where, ExportError, "dataset.")


# ------------------------------------------------------------------ older manifests


def test_a_manifest_from_before_the_optional_fields_loads_with_their_defaults(doc, tmp_path):
    for key in ("seconds", "oov_rate", "like", "joins", "vocab_from", "periods"):
        doc.pop(key, None)
    for source in doc["sources"]:
        for f in source["files"]:
            del f["bytes"]  # before shards carried sizes
    m = load_manifest(_dataset(tmp_path, doc))
    assert (m.seconds, m.oov_rate, m.like, m.joins, m.vocab_from, m.periods) == (None,) * 6
    assert m.units == doc["sources"] and m.unit_kind == "sources"
    assert m.to_json() == doc  # no key invented
