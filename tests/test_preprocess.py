"""Preprocessing (TSV / TSV.gz → Parquet + manifest) and the synthetic generator."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import pty
import re
import resource
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from helpers import REPO, dataset_state, dlrm, quiet, read_units, tsv_row, write_lines

import dlrm.preprocess.driver as pre
from dlrm import cli
from dlrm.errors import PreprocessError
from dlrm.metrics import auc
from dlrm.preprocess.driver import Encoding, preprocess
from dlrm.rows.codecs import hex_column
from dlrm.rows.vocab import hash_table, probe
from dlrm.schema.features import (
    DENSE_NAMES,
    LABEL,
    MISSING_ID,
    NUM_DENSE,
    NUM_SPARSE,
    OOV_ID,
    SPARSE_NAMES,
    TSV_COLUMNS,
    holdout_halves,
)
from dlrm.schema.manifest import Manifest, load_manifest
from dlrm.synth.criteo import synth

ROWS_PER_DAY = 20_000


def read_raw(path: Path) -> pa.Table:
    """A Criteo TSV(.gz) as strings, read independently of the preprocessor."""
    compression = "gzip" if path.suffix == ".gz" else None
    return pacsv.read_csv(
        pa.input_stream(path, compression=compression),
        read_options=pacsv.ReadOptions(column_names=TSV_COLUMNS),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in TSV_COLUMNS},
                                             strings_can_be_null=False),
    )


def read_source(out: Path, manifest: Manifest, name: str) -> pa.Table:
    return read_units(out, [s for s in manifest.sources if s["name"] == name])


def expected_dense(raw: list[str]) -> np.ndarray:
    x = np.array([float(v) if v else 0.0 for v in raw])
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


def reference_vocab(values: list[str], min_frequency: int = 1) -> dict[int, int]:
    """value → id: by descending count, then ascending value, from 2."""
    counts = Counter(int(v, 16) for v in values if v)
    kept = sorted((v for v, c in counts.items() if c >= min_frequency),
                  key=lambda v: (-counts[v], v))
    return {v: i + 2 for i, v in enumerate(kept)}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    """Two synthetic gzipped days, preprocessed with 2 workers."""
    tmp = tmp_path_factory.mktemp("synth")
    truth = synth(tmp / "raw", days=2, rows_per_day=ROWS_PER_DAY, seed=3, gzip=True)
    inputs = [tmp / "raw" / "day_0.gz", tmp / "raw" / "day_1.gz"]
    out = tmp / "dataset"
    manifest = preprocess(inputs, out, workers=2, log=quiet)
    raw = {p.name.removesuffix(".gz"): read_raw(p) for p in inputs}
    return {"tmp": tmp, "inputs": inputs, "out": out, "manifest": manifest, "truth": truth,
            "raw": raw}


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    """One small plain-text synthetic day."""
    tmp = tmp_path_factory.mktemp("small")
    synth(tmp, days=1, rows_per_day=2000, seed=5)
    return tmp / "day_0"


# ------------------------------------------------------------------ synthetic dataset


def test_manifest_summary(synth_data):
    m = synth_data["manifest"]
    assert {"rows_accepted", "rows_rejected", "rejected_by_reason", "cardinalities",
            "encoding", "sources"} <= m.to_json().keys()
    assert m.rows_accepted == 2 * ROWS_PER_DAY
    assert m.rows_rejected == 0 and m.rejected_by_reason == {}
    assert m.encoding == {"type": "vocab", "min_frequency": 1, "max_vocab": 0}
    assert len(m.cardinalities) == NUM_SPARSE
    assert all(type(c) is int and c >= 2 for c in m.cardinalities)
    assert [s["name"] for s in m.sources] == ["day_0", "day_1"]
    for s in m.sources:
        assert s["rows_accepted"] == sum(f["rows"] for f in s["files"]) == ROWS_PER_DAY
    assert load_manifest(synth_data["out"]) == m


def test_parquet_types_and_id_ranges(synth_data):
    out, m = synth_data["out"], synth_data["manifest"]
    vocab = np.load(out / "vocab.npz")
    for name in ("day_0", "day_1"):
        table = read_source(out, m, name)
        assert table.schema.field(LABEL).type == pa.int8()
        for c in DENSE_NAMES:
            assert table.schema.field(c).type == pa.float32()
        for c, card in zip(SPARSE_NAMES, m.cardinalities, strict=True):
            assert table.schema.field(c).type == pa.int64()
            ids = table.column(c).to_numpy()
            assert ids.min() >= 0 and ids.max() < card
    for c, card in zip(SPARSE_NAMES, m.cardinalities, strict=True):
        assert vocab[c].dtype == np.uint64
        assert vocab[c].size + 2 == card


def test_rows_match_an_independent_encoding(synth_data):
    """Labels, dense and ids of a few columns, row by row, from the raw .gz files. The
    vocabularies are counted on the default training rows (day_0): a value only day_1
    holds is out of vocabulary."""
    out, m, raw = synth_data["out"], synth_data["manifest"], synth_data["raw"]
    features = ["C1", "C3", "C19"]  # small vocab, large vocab, often missing
    vocabs = {c: reference_vocab(raw["day_0"].column(c).to_pylist()) for c in features}
    assert m.vocab_from == {"specs": ["day_0"], "default": True,
                               "rows": [[0, ROWS_PER_DAY]], "rows_counted": ROWS_PER_DAY}
    unseen = 0
    for name, src in raw.items():
        table = read_source(out, m, name)
        assert table.num_rows == src.num_rows == ROWS_PER_DAY
        assert table.column(LABEL).to_pylist() == [int(v) for v in src.column(LABEL).to_pylist()]
        for c in ("I1", "I2", "I12"):  # I2 has negatives, I1 / I12 are often missing
            np.testing.assert_array_equal(table.column(c).to_numpy(),
                                          expected_dense(src.column(c).to_pylist()))
        for c in features:
            want = [vocabs[c].get(int(v, 16), OOV_ID) if v else MISSING_ID
                    for v in src.column(c).to_pylist()]
            assert table.column(c).to_pylist() == want, c
            unseen += name == "day_1" and want.count(OOV_ID)
    assert unseen > 100  # C3's large vocabulary has many values day_0 never saw


def test_vocab_holds_exact_values(synth_data):
    vocab = np.load(synth_data["out"] / "vocab.npz")
    raw = synth_data["raw"]
    for c in ("C3", "C16"):  # 8-hex-digit values, most of them above 2**24
        values = {int(v, 16) for v in raw["day_0"].column(c).to_pylist() if v}
        assert sum(v > 2**24 for v in values) > 0.9 * len(values)
        assert set(vocab[c].tolist()) == values
        assert len(vocab[c]) == len(values)


def test_large_values_stay_distinct(tmp_path):
    # Neighbours above 2**24 (float32) and above 2**53 (float64) must not merge.
    hexes = ["ffffffff", "1000000", "1000001", "20000000000000", "20000000000001",
             "8000000000000000", "8000000000000001", "ffffffffffffffff", "0", "00ff", "FF"]
    rows = [tsv_row("0", None, [h] + ["1"] * (NUM_SPARSE - 1)) for h in hexes]
    out = tmp_path / "dataset"
    m = preprocess([write_lines(tmp_path / "big.tsv", rows)], out, workers=1, log=quiet,
                   vocab_from=["big"])
    vocab = np.load(out / "vocab.npz")["C1"]
    values = [int(h, 16) for h in hexes]  # "00ff" and "FF" are the same value, 255
    assert vocab.dtype == np.uint64
    assert 4294967295 in vocab.tolist()
    assert 2**64 - 1 in vocab.tolist()
    # 255 is seen twice, so it comes first; the rest once each, by ascending value.
    assert vocab.tolist() == [255] + sorted(set(values) - {255})
    ids = read_source(out, m, "big").column("C1").to_pylist()
    want = {v: i + 2 for i, v in enumerate(vocab.tolist())}
    assert ids == [want[v] for v in values]
    assert len(set(ids)) == len(hexes) - 1


def test_eight_digit_hex_fields_every_byte_in_every_place():
    """The word-at-a-time path for 8-character fields against int(field, 16): each of
    the 256 byte values in each of the 8 places, between random hex digits; and the
    same fields through the general path (one 7-character field forces it)."""
    rng = np.random.default_rng(0)
    digits = list(b"0123456789abcdefABCDEF")
    fields = []
    for byte in range(256):
        for place in range(8):
            field = bytearray(rng.choice(digits, 8).tolist())
            field[place] = byte
            fields.append(bytes(field))
    fields += [bytes(rng.choice(digits, 8).tolist()) for _ in range(500)] + [b"", b"ffffffff"]
    valid = np.array([all(b in digits for b in f) for f in fields])
    want = np.array([int(f, 16) if ok and f else 0 for f, ok in zip(fields, valid, strict=True)],
                    dtype=np.uint64)
    assert 0 < valid.sum() < len(fields)
    for extra in ([], [b"abcdef1"]):
        every = fields + extra
        offsets = np.cumsum([0] + [len(f) for f in every])
        data = np.frombuffer(b"".join(every), np.uint8)
        values, present, ok = hex_column(offsets, data)
        n = len(fields)
        np.testing.assert_array_equal(ok[:n], valid)
        np.testing.assert_array_equal(values[:n], want)
        np.testing.assert_array_equal(present[:n], [bool(f) for f in fields])


@pytest.mark.parametrize("text, value", [
    ("", 0), ("0", 0), ("7", 7), ("-7", 0), ("-0", 0), ("007", 7), ("65535", 65535),
    ("65536", 65536), ("123456789012345678", 123456789012345678),
    ("-123456789012345678", 0),
    ("-", None), ("0x10", None), ("+5", None), (" 5", None), ("5 ", None), ("1.5", None),
    ("1e3", None), ("--5", None), ("5-", None), ("1234567890123456789", None),
    ("0000000000000000005", None), ("٣", None),
])
def test_dense_field_rules(tmp_path, text, value):
    """Missing → 0, negative → 0, then log1p; anything but an optional minus and 1 to 18
    decimal digits is a bad_dense row (pyarrow's own parser would take "0x10")."""
    rows = [tsv_row("1", ["3"] * NUM_DENSE), tsv_row("0", [text] + ["2"] * (NUM_DENSE - 1))]
    out = tmp_path / "dataset"
    m = preprocess([write_lines(tmp_path / "d.tsv", rows)], out, workers=1, log=quiet)
    table = read_source(out, m, "d")
    if value is None:
        assert m.rejected_by_reason == {"bad_dense": 1}
        assert table.num_rows == 1
    else:
        assert m.rows_rejected == 0
        want = np.log1p(np.array([3.0, value], np.float64)).astype(np.float32)
        np.testing.assert_array_equal(table.column("I1").to_numpy(), want)


@pytest.mark.parametrize("size", [0, 1, 5, 3000])
def test_vocabulary_hash_table_finds_every_value_and_nothing_else(size):
    """Value → id lookups of the vocab encoding: every vocabulary value (0 and 2**64 - 1
    among them, and runs of values that share a home slot) finds its id; other values,
    some of them sharing home slots too, find OOV_ID."""
    rng = np.random.default_rng(size)
    pool = np.unique(np.concatenate([
        rng.integers(0, 2**64 - 1, 4 * size + 8, dtype=np.uint64, endpoint=True),
        np.array([0, 2**64 - 1], np.uint64),
        np.arange(64, dtype=np.uint64) << np.uint64(58),  # few home slots, many values
    ]))
    rng.shuffle(pool)
    vocab, others = pool[:size], pool[size:]
    keys, ids = hash_table(vocab)
    assert keys.size >= 2 * size and (ids >= 0).sum() == size
    query = np.concatenate([vocab, others, vocab[::-1]])
    want = np.concatenate([np.arange(size) + 2, np.full(others.size, OOV_ID),
                           np.arange(size)[::-1] + 2])
    np.testing.assert_array_equal(probe(keys, ids, query), want)


def test_rerun_with_same_inputs_does_nothing(synth_data):
    out, inputs = synth_data["out"], synth_data["inputs"]
    files = [out / "manifest.json", out / "vocab.npz",
             *sorted((out / "data").rglob("*.parquet"))]
    before = [f.stat().st_mtime_ns for f in files]
    logged = []
    again = preprocess(inputs, out, workers=1, log=logged.append)
    assert again == synth_data["manifest"]
    assert [f.stat().st_mtime_ns for f in files] == before
    assert "nothing to do" in logged[0]


@pytest.mark.parametrize("change", ["fewer inputs", "other encoding"])
def test_rerun_with_other_dataset_is_refused(synth_data, change):
    out, inputs = synth_data["out"], synth_data["inputs"]
    before = (out / "manifest.json").stat().st_mtime_ns
    args = ((inputs[:1], Encoding()) if change == "fewer inputs"
            else (inputs, Encoding(type="hash", buckets=100)))
    with pytest.raises(PreprocessError, match="already holds another dataset") as e:
        preprocess(args[0], out, workers=1, encoding=args[1], log=quiet)
    assert str(out) in str(e.value)
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_rerun_after_input_changed_is_refused(tmp_path):
    src = write_lines(tmp_path / "day.tsv", [tsv_row()] * 3)
    out = tmp_path / "dataset"
    preprocess([src], out, workers=1, log=quiet)
    write_lines(src, [tsv_row()] * 4)
    with pytest.raises(PreprocessError, match=re.escape(str(out))):
        preprocess([src], out, workers=1, log=quiet)


def test_truth_file(synth_data):
    truth, tmp, raw = synth_data["truth"], synth_data["tmp"], synth_data["raw"]
    assert json.loads((tmp / "raw" / "truth.json").read_text()) == truth
    halves = holdout_halves(ROWS_PER_DAY)
    for split, rows in zip(("val", "test"), halves, strict=True):
        s = truth["splits"][split]
        assert s["source"] == "day_1" and s["rows"] == list(rows)
        assert 0.6 < s["bayes_auc"] < 1.0
    for name, src in raw.items():
        prob = np.load(tmp / "raw" / "truth" / f"{name}.prob.npy")
        assert prob.shape == (ROWS_PER_DAY,) and prob.dtype == np.float32
        assert ((prob > 0) & (prob < 1)).all()
        labels = np.array(src.column(LABEL).to_pylist(), dtype=np.int64)
        assert truth["days"][name]["bayes_auc"] == pytest.approx(auc(labels, prob), abs=1e-12)
        assert truth["days"][name]["ctr"] == pytest.approx(labels.mean())
    labels = np.array(raw["day_1"].column(LABEL).to_pylist())
    prob = np.load(tmp / "raw" / "truth" / "day_1.prob.npy")
    (a, b), _ = halves
    assert truth["splits"]["val"]["bayes_auc"] == pytest.approx(auc(labels[a:b], prob[a:b]))


# ----------------------------------------------------------------------------- bad rows

GOOD_I1 = ["5", "", "-7", "100", "0"]


def _bad_rows_file(path: Path) -> tuple[Path, dict[int, str], list[str]]:
    """Good rows (I1 from GOOD_I1) mixed with bad ones; returns (path, {line: reason}, lines)."""
    def good(i1: str) -> str:
        return tsv_row("1", [i1] + ["2"] * (NUM_DENSE - 1), ["0a"] * NUM_SPARSE)

    lines = [
        good(GOOD_I1[0]),                                              # 1
        "1\t2\t3",                                                     # 2 wrong_field_count
        good(GOOD_I1[1]),                                              # 3
        "",                                                            # 4 empty_line
        tsv_row("2"),                                                  # 5 bad_label
        good(GOOD_I1[2]),                                              # 6
        tsv_row("1", ["1", "2", "3", "abc"] + ["1"] * (NUM_DENSE - 4)),  # 7 bad_dense
        tsv_row("0", None, ["1"] * 4 + ["zz"] + ["1"] * (NUM_SPARSE - 5)),  # 8 bad_categorical
        tsv_row("x", ["abc"] * NUM_DENSE),                             # 9 bad_label (first)
        good(GOOD_I1[3]),                                              # 10
        tsv_row() + "\t1",                                             # 11 wrong_field_count
        tsv_row("1", ["1.5"] + ["1"] * (NUM_DENSE - 1)),               # 12 bad_dense
        good(GOOD_I1[4]),                                              # 13
    ]
    reasons = {2: "wrong_field_count", 4: "empty_line", 5: "bad_label", 7: "bad_dense",
               8: "bad_categorical", 9: "bad_label", 11: "wrong_field_count", 12: "bad_dense"}
    return write_lines(path, lines), reasons, lines


def test_bad_rows_are_counted_and_written_with_line_numbers(tmp_path):
    src, reasons, lines = _bad_rows_file(tmp_path / "mixed.tsv")
    out = tmp_path / "dataset"
    m = preprocess([src], out, workers=1, log=quiet)
    assert m.rejected_by_reason == {"bad_categorical": 1, "bad_dense": 2, "bad_label": 2,
                                       "empty_line": 1, "wrong_field_count": 2}
    assert m.rows_rejected == len(reasons) == 8
    assert m.rows_accepted == len(GOOD_I1)
    assert m.sources[0]["rows_read"] == len(lines)
    rejects = (out / "rejects" / "mixed.tsv").read_text().splitlines()
    got = {}
    for entry in rejects:
        line, reason, text = entry.split("\t", 2)
        got[int(line)] = reason
        if lines[int(line) - 1]:
            assert text == lines[int(line) - 1]
    assert got == reasons
    table = read_source(out, m, "mixed")
    np.testing.assert_array_equal(table.column("I1").to_numpy(), expected_dense(GOOD_I1))
    assert table.column(LABEL).to_pylist() == [1] * len(GOOD_I1)


def test_reject_line_numbers_across_chunks_and_blocks(tmp_path):
    """Line numbers stay file-wide and right when bad rows fall in many chunks and blocks."""
    lines, reasons = [], {}
    for n in range(1, 401):
        if n % 17 == 0:
            lines.append("1\t2")
            reasons[n] = "wrong_field_count"
        elif n % 23 == 0:
            lines.append(tsv_row("7"))
            reasons[n] = "bad_label"
        elif n % 41 == 0:
            lines.append("")
            reasons[n] = "empty_line"
        else:
            lines.append(tsv_row("1", [str(n)] + ["1"] * (NUM_DENSE - 1)))
    lines.append("1\t2")  # a bad last line
    reasons[len(lines)] = "wrong_field_count"
    src = write_lines(tmp_path / "blocks.tsv", lines)
    # Chunks of ~30 lines read in blocks of ~10, so bad rows fall in many chunks and
    # blocks, and chunk boundaries land mid-line.
    opts = pre.Options(workers=2, chunk_bytes=3001, block_bytes=1000)
    m = preprocess([src], tmp_path / "out", log=quiet, options=opts)
    got = {}
    for row in (tmp_path / "out" / "rejects" / "blocks.tsv").read_text().splitlines():
        line, reason, _ = row.split("\t", 2)
        got[int(line)] = reason
    assert got == reasons
    table = read_source(tmp_path / "out", m, "blocks")
    good = [n for n in range(1, len(lines) + 1) if n not in reasons]
    np.testing.assert_array_equal(table.column("I1").to_numpy(), expected_dense(good))
    assert len(m.sources[0]["files"]) > 10  # really many chunks


def test_empty_sources_have_no_rows(tmp_path):
    empty = tmp_path / "day_0"
    empty.write_bytes(b"")
    empty_gz = tmp_path / "day_1.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    good = write_lines(tmp_path / "day_2", [tsv_row()] * 3)
    m = preprocess([empty, empty_gz, good], tmp_path / "dataset", workers=1, log=quiet)
    assert [(s["name"], s["rows_read"], s["files"]) for s in m.sources[:2]] == [
        ("day_0", 0, []), ("day_1", 0, [])]
    assert m.rows_accepted == 3 and m.rows_rejected == 0


# ---------------------------------------------------------------------------- encodings


def test_hash_encoding_via_cli(small_raw, tmp_path):
    out = tmp_path / "dataset"
    rc = cli.main(["preprocess", "--input", str(small_raw), "--out", str(out), "--workers", "1",
                   "--encoding", "hash", "--buckets", "1000"])
    assert rc == 0
    m = load_manifest(out)
    assert m.encoding == {"type": "hash", "buckets": 1000}
    assert m.cardinalities == [1000] * NUM_SPARSE
    assert not (out / "vocab.npz").exists()
    table, raw = read_source(out, m, "day_0"), read_raw(small_raw)
    for c in SPARSE_NAMES:
        ids = table.column(c).to_pylist()
        assert ids == [1 + int(v, 16) % 999 if v else MISSING_ID
                       for v in raw.column(c).to_pylist()], c
        assert 0 <= min(ids) and max(ids) < 1000
    assert MISSING_ID in table.column("C19").to_pylist()


def test_vocab_min_frequency(small_raw, tmp_path):
    out = tmp_path / "dataset"
    m = preprocess([small_raw], out, workers=1, encoding=Encoding(min_frequency=2), log=quiet,
                   vocab_from=["day_0"])
    assert m.encoding["min_frequency"] == 2
    table, raw = read_source(out, m, "day_0"), read_raw(small_raw)
    vocab = np.load(out / "vocab.npz")
    singletons = 0
    for f, c in enumerate(SPARSE_NAMES):
        values = raw.column(c).to_pylist()
        ref = reference_vocab(values, min_frequency=2)
        assert vocab[c].tolist() == list(ref)
        assert m.cardinalities[f] == len(ref) + 2
        counts = Counter(values)
        want = [MISSING_ID if not v else ref[int(v, 16)] if counts[v] >= 2 else OOV_ID
                for v in values]
        assert table.column(c).to_pylist() == want, c
        singletons += sum(n == 1 for v, n in counts.items() if v)
    assert singletons > 1000  # the large vocabularies have many values seen once


def test_vocab_max_vocab(small_raw, tmp_path):
    out = tmp_path / "dataset"
    m = preprocess([small_raw], out, workers=1, encoding=Encoding(max_vocab=3), log=quiet)
    table, raw = read_source(out, m, "day_0"), read_raw(small_raw)
    assert all(c <= 5 for c in m.cardinalities)
    values = raw.column("C3").to_pylist()
    top = dict(list(reference_vocab(values).items())[:3])
    want = [top.get(int(v, 16), OOV_ID) if v else MISSING_ID for v in values]
    assert table.column("C3").to_pylist() == want


# ------------------------------------------------------------------------ input errors


def test_missing_input(tmp_path):
    out = tmp_path / "dataset"
    missing = tmp_path / "nope" / "day_0.gz"
    with pytest.raises(PreprocessError, match=re.escape(str(missing))):
        preprocess([write_lines(tmp_path / "day_1", [tsv_row()]), missing], out, log=quiet)
    assert not out.exists()


def test_clashing_source_names(tmp_path):
    a = write_lines(tmp_path / "day_0", [tsv_row()])
    b = write_lines(tmp_path / "day_0.gz", [tsv_row()])
    with pytest.raises(PreprocessError, match="day_0"):
        preprocess([a, b], tmp_path / "dataset", log=quiet)


@pytest.mark.parametrize("encoding", ["vocab", "hash"])
def test_progress_bar_on_a_terminal_ends_at_exactly_the_input_size(tmp_path, encoding):
    """On a terminal (a pseudo-terminal here) the bar counts input bytes, once per pass:
    it ends at 100%, never past it, however the chunks cut the files."""
    synth(tmp_path / "raw", days=2, rows_per_day=8000, seed=4, gzip=False)
    gz = tmp_path / "raw" / "day_1.gz"
    gz.write_bytes(gzip.compress((tmp_path / "raw" / "day_1").read_bytes()))
    cmd = [sys.executable, "-m", "dlrm", "preprocess", "--input", str(tmp_path / "raw" / "day_0"),
           str(gz), "--out", str(tmp_path / "out"), "--workers", "2", "--chunk-mb", "0.3",
           "--encoding", encoding]
    pid, fd = pty.fork()
    if pid == 0:  # the child: a 100-column terminal, then the command
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        os.chdir(REPO)
        os.execv(sys.executable, cmd)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while data := os.read(fd, 1 << 16):
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    bars = [b for b in b"".join(chunks).decode().replace("\r", "\n").splitlines()
            if b.startswith("preprocess:") and "|" in b]
    assert bars, "no progress bar on a terminal"
    assert all("%" in b for b in bars)  # past its total, tqdm drops the percentage
    total = (tmp_path / "raw" / "day_0").stat().st_size + gz.stat().st_size
    assert bars[-1].startswith("preprocess: 100%")
    done, of, unit = re.search(r"\| *([\d.]+[kM]?)/([\d.]+)([kM]?) ", bars[-1]).groups()
    assert done == of + unit
    passes = 2 if encoding == "vocab" else 1
    assert float(of) * {"": 1, "k": 1e3, "M": 1e6}[unit] == pytest.approx(total * passes,
                                                                         rel=0.01)


def test_cli_missing_input_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.tsv"
    rc = cli.main(["preprocess", "--input", str(missing), "--out", str(tmp_path / "dataset")])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err


# ---------------------------------------------------------------------------- generator


def test_synth_is_deterministic(tmp_path):
    def day_bytes(name: str, seed: int, days: int = 2) -> list[bytes]:
        synth(tmp_path / name, days=days, rows_per_day=300, seed=seed)
        return [(tmp_path / name / f"day_{d}").read_bytes() for d in range(days)]

    a, b, c = day_bytes("a", 7), day_bytes("b", 7), day_bytes("c", 8)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert a[0] != a[1]
    assert day_bytes("d", 7, days=1) == a[:1]  # day d depends only on (seed, d)
    # A rerun over a complete output rewrites nothing.
    before = os.stat(tmp_path / "a" / "day_0").st_mtime_ns
    synth(tmp_path / "a", days=2, rows_per_day=300, seed=7)
    assert os.stat(tmp_path / "a" / "day_0").st_mtime_ns == before


# ----------------------------------------------------------- every kind of bad input


def test_every_kind_of_bad_line_in_plain_and_gzip_sources(tmp_path):
    """Overlong lines, invalid UTF-8 and a truncated gzip member, beside the field-level
    problems: counted by reason, written with file-wide line numbers, good rows kept."""
    good_i1 = [str(v) for v in range(1, 9)]

    def good(i: int) -> bytes:
        return tsv_row("1", [good_i1[i]] + ["1"] * (NUM_DENSE - 1)).encode()

    lines = [
        good(0),                                                        # 1
        b"1\t" + b"9" * 5000,                                           # 2 line_too_long
        good(1),                                                        # 3
        tsv_row("1", None, ["ab\xffcd"] + ["1"] * 25).encode("latin-1"),  # 4 invalid_utf8
        good(2),                                                        # 5
        "é\t1".encode(),                                               # 6 wrong_field_count
        good(3),                                                        # 7
        b"x" * 70_000,                                                  # 8 longer than a block
        good(4),                                                        # 9
    ]
    plain = tmp_path / "day_0"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    # day_1.gz: two gzip members, the second cut off in the middle of its third line.
    first = gzip.compress(good(5) + b"\n" + good(6) + b"\n")
    second = gzip.compress((good(7) + b"\n") * 2 + b"1\t2\t3\t4\n" * 200)
    (tmp_path / "day_1.gz").write_bytes(first + second[: len(second) // 2])

    opts = pre.Options(workers=2, block_bytes=4096, max_line_bytes=4000)
    m = preprocess([plain, tmp_path / "day_1.gz"], tmp_path / "out", log=quiet, options=opts)
    day0, day1 = m.sources
    assert day0["rejected_by_reason"] == {"invalid_utf8": 1, "line_too_long": 2,
                                          "wrong_field_count": 1}
    rejects = (tmp_path / "out" / "rejects" / "day_0.tsv").read_bytes().splitlines()
    assert [r.split(b"\t")[:2] for r in rejects] == [
        [b"2", b"line_too_long"], [b"4", b"invalid_utf8"], [b"6", b"wrong_field_count"],
        [b"8", b"line_too_long"]]
    table = read_source(tmp_path / "out", m, "day_0")
    np.testing.assert_array_equal(table.column("I1").to_numpy(),
                                  expected_dense(good_i1[:5]))

    # The truncated member: the complete lines before the cut are kept, then one reject.
    assert day1["rejected_by_reason"].get("truncated_gzip") == 1
    table = read_source(tmp_path / "out", m, "day_1")
    assert table.num_rows >= 4
    np.testing.assert_array_equal(table.column("I1").to_numpy()[:4],
                                  expected_dense(good_i1[5:8] + good_i1[7:8]))
    reject_lines = (tmp_path / "out" / "rejects" / "day_1.tsv").read_text().splitlines()
    truncated = [r for r in reject_lines if "\ttruncated_gzip\t" in r]
    assert len(truncated) == 1
    assert int(truncated[0].split("\t")[0]) == day1["rows_read"]  # the last line read
    assert m.rows_rejected == sum(m.rejected_by_reason.values())


def _chunks(log: str, what: str) -> int:
    """N of the log line "preprocess: counting the values of N chunks" (what="counting
    the values") or "...: writing the shards of N chunks" (what="writing the shards");
    0 when the pass did not run."""
    found = re.findall(rf"preprocess: {what} of (\d+) chunks", log)
    assert len(found) <= 1, log
    return int(found[0]) if found else 0


@pytest.mark.parametrize("encoding, stage, drop_staged", [
    ("vocab", "counts", False), ("vocab", "done", False), ("hash", "done", False),
    ("vocab", "counts", True),
])
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path, encoding, stage,
                                                          drop_staged):
    """Killed once 3 chunks have finished a pass (vocab: the counting pass, or the
    encoding pass; hash: its one pass), the rerun finishes the same dataset, redoing only
    the chunks that had not finished: the finished ones' shards are kept as written. When
    the counted chunks' staged rows are gone (an unfinished run of a version that did not
    stage them), those chunks are counted again."""
    synth(tmp_path / "raw", days=2, rows_per_day=30_000, seed=5)
    inputs = [str(tmp_path / "raw" / f"day_{d}") for d in range(2)]
    args = ["--workers", "2", "--chunk-mb", "0.5", "--encoding", encoding]  # ~14 chunks a day

    log = dlrm("preprocess", "--input", *inputs, "--out", str(tmp_path / "whole"), *args).stdout
    chunks = _chunks(log, "writing the shards")
    assert chunks > 20 and _chunks(log, "counting the values") == (chunks if encoding == "vocab"
                                                                   else 0), log

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dlrm", "preprocess", "--input", *inputs, "--out", str(killed),
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marks = killed / "_work" / stage

    def finished() -> list[Path]:  # chunks whose mark is written (a temporary one is not)
        return [p for p in marks.glob("*.json") if ".tmp" not in p.name]

    deadline = time.time() + 120
    while time.time() < deadline and len(finished()) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-run
    proc.wait()
    done = finished()
    assert 3 <= len(done) < chunks and not (killed / "manifest.json").exists()
    kept = {}  # the shards of the chunks already written: (inode, mtime)
    if stage == "done":
        for mark in done:
            for f in json.loads(mark.read_text())["files"]:
                stat = (killed / f["path"]).stat()
                kept[f["path"]] = (stat.st_ino, stat.st_mtime_ns)
        assert len(kept) >= 3
    if drop_staged:
        for path in (killed / "_work" / "staged").glob("*"):
            path.unlink()

    log = dlrm("preprocess", "--input", *inputs, "--out", str(killed), *args).stdout
    assert "resuming" in log
    counted, written = _chunks(log, "counting the values"), _chunks(log, "writing the shards")
    if stage == "counts":  # the rest counted (all, their staged rows gone), all written
        assert counted == (chunks if drop_staged else chunks - len(done)), log
        assert written == chunks, log
    else:  # all counted before; the rest written
        assert counted == 0 and written == chunks - len(done), log
    for path, stat in kept.items():
        now = (killed / path).stat()
        assert (now.st_ino, now.st_mtime_ns) == stat, path
    assert dataset_state(killed) == dataset_state(tmp_path / "whole")
    assert not (killed / "_work").exists()


def test_failed_write_is_fatal_and_leaves_no_manifest(tmp_path):
    """A write that fails (here: the file size limit, as a full disk would) stops the run
    with a message naming the output, a non-zero exit, and no manifest."""
    synth(tmp_path / "raw", days=1, rows_per_day=20_000, seed=2)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm", "preprocess", "--input", str(tmp_path / "raw" / "day_0"),
         "--out", str(out), "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "dlrm preprocess: error:" in proc.stderr and str(out) in proc.stderr
    assert not (out / "manifest.json").exists()
