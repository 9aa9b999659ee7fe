"""Vocabularies counted on the training rows only (`dlrm preprocess --vocab-from`), and
training's checks of its splits: no overlap, no empty list, no val or test row counted."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, dlrm, quiet, tsv_row, write_lines

from dlrm import cli
from dlrm.config import load_config
from dlrm.errors import PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.rows.chunks import Options
from dlrm.schema.declared import load_schema
from dlrm.schema.features import MISSING_ID, NUM_DENSE, NUM_SPARSE, OOV_ID
from dlrm.schema.splits import resolve_split
from dlrm.train.trainer import preflight

TINY = REPO / "configs" / "tiny.toml"


def _criteo_days(tmp_path, days=3, rows=300):
    """Day files whose C1 is a value per row (hex of the global row number) and C2 one of
    a few: every row's values are told apart."""
    paths, start = [], 0
    for d in range(days):
        lines = [tsv_row(str(i % 2), ["1"] * NUM_DENSE,
                         [f"{i:x}", f"{i % 7:x}"] + ["1"] * (NUM_SPARSE - 2))
                 for i in range(start, start + rows)]
        paths.append(write_lines(tmp_path / f"day_{d}", lines))
        start += rows
    return paths


def _ids(out, manifest, column):
    segments = resolve_split(out, manifest, ["*"])
    return np.concatenate([pq.read_table(s.path, columns=[column]).column(column).to_numpy()
                           [s.start:s.stop] for s in segments])


def test_default_counts_every_day_but_the_last(tmp_path):
    out = tmp_path / "data"
    m = preprocess(_criteo_days(tmp_path), out, workers=1, log=quiet)
    assert m.vocab_from == {"specs": ["day_0", "day_1"], "default": True,
                               "rows": [[0, 600]], "rows_counted": 600}
    c1 = _ids(out, m, "C1")
    # Each C1 value is seen once: the counted rows have ids of their own, the last day's
    # are all out of vocabulary.
    assert sorted(c1[:600].tolist()) == list(range(2, 602)) and (c1[600:] == OOV_ID).all()
    assert m.cardinalities[0] == 602
    assert (_ids(out, m, "C2") >= 2).all()  # C2's values are all seen in training


@pytest.mark.parametrize(("specs", "want", "stage"), [
    (["*[0:0.55]", "day_2[0.9:1]"], [[0, 495], [870, 900]], True),
    (["*[0:0.55]", "day_2[0.9:1]"], [[0, 495], [870, 900]], False),  # counted from the text
    (["day_1[1/3:2/3]"], [[400, 500]], True)])
def test_exactly_the_named_rows_are_counted_in_chunks_across_the_bounds(tmp_path, specs, want,
                                                                         stage):
    """Small chunks: the bounds fall inside chunks, which are counted again (from their
    staged rows, or without staging from their text)."""
    out = tmp_path / "data"
    logged = []
    m = preprocess(_criteo_days(tmp_path), out, log=logged.append, vocab_from=specs,
                   options=Options(workers=2, chunk_bytes=6000, stage=stage))
    rows = np.zeros(900, bool)
    for lo, hi in m.vocab_from["rows"]:
        rows[lo:hi] = True
    assert m.vocab_from["rows"] == want
    assert any("counted again" in line and not line.split(";")[1].startswith(" 0 ")
               for line in logged)
    c1 = _ids(out, m, "C1")
    assert (c1[rows] >= 2).all() and (c1[~rows] == OOV_ID).all()
    assert np.unique(c1[rows]).size == rows.sum() == m.cardinalities[0] - 2


def test_a_time_column_counts_the_earliest_rows_ties_in_input_order(tmp_path):
    """Rows out of time order with many ties, cut into chunks: `*[0:0.7]` is the first 70%
    of the dataset's own order (by time, ties as they came), however the chunks fall."""
    rng = np.random.default_rng(0)
    n = 2000
    times = 1_400_000_000 + rng.integers(0, 40, n) * 3600 * 6  # 10 days, heavy ties
    path = tmp_path / "log.csv"
    with open(path, "w") as f:
        f.write("click,ts,row\n")
        f.writelines(f"{i % 2},{t},r{i}\n" for i, t in enumerate(times))
    schema_path = tmp_path / "schema.toml"
    schema_path.write_text('[input]\nformat = "csv"\nheader = true\n[label]\ncolumn = "click"\n'
                           '[categorical]\ncolumns = ["row"]\nencoding = "vocab"\n'
                           '[time]\ncolumn = "ts"\nformat = "unix"\nperiod = "day"\n')
    out = tmp_path / "data"
    m = preprocess([path], out, schema=load_schema(schema_path), vocab_from=["*[0:0.7]"],
                   log=quiet, options=Options(workers=2, chunk_bytes=5000))
    assert m.vocab_from["rows"] == [[0, 1400]]
    order = np.lexsort((np.arange(n), times))  # the dataset's row order
    ids = _ids(out, m, "row")
    assert (ids[:1400] >= 2).all() and (ids[1400:] == OOV_ID).all()
    vocab = np.load(out / "vocab.npz")["row"]
    assert vocab.size == 1400
    from dlrm.rows.codecs import category_values

    texts = pa.array([f"r{i}".encode() for i in order[:1400]], pa.binary())
    assert set(vocab.tolist()) == set(category_values(texts, "auto")[0].tolist())


def test_a_rerun_asking_for_other_rows_is_another_dataset(tmp_path):
    days, out = _criteo_days(tmp_path), tmp_path / "data"
    preprocess(days, out, workers=1, log=quiet)
    logged = []
    preprocess(days, out, workers=1, log=logged.append, vocab_from=["day_0", "day_1"])
    assert "nothing to do" in logged[0]  # the default, named
    with pytest.raises(PreprocessError, match="another dataset"):
        preprocess(days, out, workers=1, log=quiet, vocab_from=["*"])
    with pytest.raises(PreprocessError, match="day_9"):
        preprocess(days, tmp_path / "other", workers=1, log=quiet, vocab_from=["day_9"])


def _train_error(capsys, *overrides, data):
    code = cli.main(["train", "--config", str(TINY), f"--data.path={data}", *overrides])
    return code, capsys.readouterr().err


def test_overlapping_splits_are_refused_naming_both(small_dataset, capsys):
    code, err = _train_error(capsys, '--data.train_sources=["*[0:0.8]"]',
                             '--data.val_sources=["*[0.7:0.8]"]', data=small_dataset)
    assert code == 2
    assert "data.train_sources" in err and "data.val_sources" in err and "share 1200 rows" in err
    assert "day_2 rows 400..1599" in err and "data.allow_overlap" in err
    config = load_config(TINY, [f"--data.path={small_dataset}", "--data.allow_overlap=true",
                                '--data.train_sources=["*[0:0.8]"]',
                                '--data.val_sources=["*[0.7:0.8]"]'])
    preflight(config)  # asked for by name: accepted
    code, err = _train_error(capsys, '--data.train_sources=["day_0", "*"]',
                             data=small_dataset)
    assert code == 2 and "data.train_sources" in err and "4000 rows" in err and "twice" in err


def test_an_empty_split_list_is_an_error_and_none_is_asked_by_name(small_dataset, capsys):
    code, err = _train_error(capsys, "--data.val_sources=[]", data=small_dataset)
    assert code == 2 and "data.val_sources" in err and "empty" in err and '"none"' in err
    code, err = _train_error(capsys, "--data.train_sources=none", data=small_dataset)
    assert code == 2 and "data.train_sources" in err
    config = load_config(TINY, [f"--data.path={small_dataset}", "--data.val_sources=none"])
    assert config.data.val_sources == "none"
    preflight(config)
    code, err = _train_error(capsys, "--data.val_sources=none", "--train.early_stopping=2",
                             data=small_dataset)
    assert code == 2 and "train.early_stopping" in err and "validation" in err


def test_val_rows_the_vocabulary_counted_are_a_leak(small_dataset, capsys, caplog):
    # day_1 was counted (the default: every day but the last).
    code, err = _train_error(capsys, '--data.train_sources=["day_0"]',
                             '--data.val_sources=["day_1[0:0.5]"]',
                             '--data.test_sources=["day_2"]', data=small_dataset)
    assert code == 2
    assert "data.val_sources" in err and "counted by the vocabularies" in err
    assert "--vocab-from day_0 day_1" in err and "2000 rows (day_1 rows 0..1999)" in err
    # Training rows the vocabulary did not count: a warning only.
    config = load_config(TINY, [f"--data.path={small_dataset}",
                                '--data.train_sources=["day_0", "day_1", "day_2[0:0.5]"]',
                                '--data.val_sources=["day_2[0.5:0.75]"]',
                                '--data.test_sources=["day_2[0.75:1]"]'])
    with caplog.at_level(logging.WARNING):
        preflight(config)
    assert "2000 rows (day_2 rows 0..1999) of the training rows were not counted" in caplog.text


def test_a_dataset_from_before_the_record_trains_with_a_warning(small_dataset, tmp_path,
                                                                caplog):
    old = tmp_path / "old"
    shutil.copytree(small_dataset, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["vocab_from"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        preflight(load_config(TINY, [f"--data.path={old}"]))
    assert "does not record which rows" in caplog.text


def test_evaluate_and_score_refuse_data_of_another_label_kind(trained, tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "ratings"
    dlrm("synth", "--schema", "movielens_rating", "--out", str(raw), "--days", "2",
         "--rows-per-day", "300")
    dlrm("preprocess", "--schema", "movielens_rating", "--input",
         *map(str, sorted(raw.glob("day_*"))), "--out", str(data))
    for command in (["evaluate"], ["score", "--out", str(tmp_path / "s.parquet")]):
        proc = dlrm(*command, "--checkpoint", str(trained), "--data", str(data), check=False)
        assert proc.returncode == 2, proc.stderr
        assert "regression" in proc.stderr and "binary" in proc.stderr
        assert str(data) in proc.stderr and "Traceback" not in proc.stderr


def test_the_oov_row_trains_for_values_it_stands_for(tmp_path):
    """Values below min_frequency in the training rows are the OOV id everywhere; the
    missing value stays missing."""
    lines = [tsv_row("1", None, [v] + ["1"] * (NUM_SPARSE - 1))
             for v in ["a", "a", "b", "", "c", "a"]]
    out = tmp_path / "data"
    from dlrm.rows.vocab import Encoding

    m = preprocess([write_lines(tmp_path / "d", lines)], out, log=quiet,
                   encoding=Encoding(min_frequency=2), vocab_from=["d[0:4/6]"])
    counted = Counter(v for v in ["a", "a", "b", ""] if v)
    assert counted == {"a": 2, "b": 1}
    assert _ids(out, m, "C1").tolist() == [2, 2, OOV_ID, MISSING_ID, OOV_ID, 2]
