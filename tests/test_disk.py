"""Staging that fits the disk: `--no-stage` parses twice and gives the same dataset; an
output file system (a real tmpfs, mounted here) too small for the staged rows takes that
path by itself, and one too small for the shards is refused before anything is written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import quiet, read_units

from dlrm.errors import PreprocessError
from dlrm.preprocess.disk import estimate
from dlrm.preprocess.driver import preprocess
from dlrm.rows.chunks import Options
from dlrm.rows.inputs import layout_of
from dlrm.rows.vocab import Encoding
from dlrm.schema.declared import load_schema
from dlrm.synth.criteo import synth


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("disk")
    synth(root, days=3, rows_per_day=20_000, seed=3)
    paths = [root / f"day_{d}" for d in range(3)]
    with open(paths[1], "a") as f:  # a few bad lines, so the rejects are compared too
        f.write("x\t1\n\n" + "1\t" * 39 + "zz\n")
    return paths


def _same(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("seconds")
        for s in m["sources"]:
            s.pop("path")
    assert ma == mb
    assert read_units(a, ma["sources"]).equals(read_units(b, mb["sources"]))
    va, vb = np.load(a / "vocab.npz"), np.load(b / "vocab.npz")
    assert all(np.array_equal(va[k], vb[k]) for k in va.files)
    for s in ma["sources"]:
        name = f"rejects/{s['name']}.tsv"
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_no_stage_parses_twice_and_gives_the_same_dataset(raw, tmp_path):
    staged = preprocess(raw, tmp_path / "staged", log=quiet, options=Options(chunk_bytes=1 << 20))
    assert staged.rows_rejected == 3
    preprocess(raw, tmp_path / "twice", log=quiet,
               options=Options(chunk_bytes=1 << 20, stage=False))
    _same(tmp_path / "staged", tmp_path / "twice")


def _tmpfs(path: Path, size: int):
    path.mkdir()
    pages = -(-size // 4096) * 4096
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return path


def test_a_small_disk_takes_the_two_parse_path_or_is_refused(raw, tmp_path):
    layout = layout_of(load_schema("criteo"), Encoding(), raw)
    needs = estimate(raw, layout)
    assert needs.staged > 0 and needs.shards > 0
    reference = tmp_path / "reference"
    preprocess(raw, reference, log=quiet)

    roomy = _tmpfs(tmp_path / "roomy", needs.shards + needs.staged // 2)
    small = _tmpfs(tmp_path / "small", needs.shards // 4)
    try:
        said: list[str] = []
        preprocess(raw, roomy / "data", log=said.append)
        assert any("parsing the inputs twice" in s for s in said), said
        _same(reference, roomy / "data")

        with pytest.raises(PreprocessError, match="bytes needed for the shards") as e:
            preprocess(raw, small / "data", log=quiet)
        assert f"{needs.shards:,}" in str(e.value) and "free on" in str(e.value)
        assert not (small / "data").exists()  # nothing written
    finally:
        for fs in (roomy, small):
            subprocess.run(["umount", str(fs)], check=False)
