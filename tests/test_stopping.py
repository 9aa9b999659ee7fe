"""Knowing when to stop: early stopping and the best checkpoint by the validation metric,
through `dlrm train --nproc-per-node 2` (which checks the config, then starts torchrun)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from conftest import SMALL
from helpers import dlrm, tsv_row, write_lines

from dlrm.data.loader import ParquetBatches
from dlrm.data.oov_dropout import drop_to_oov, uniform
from dlrm.preprocess.driver import preprocess
from dlrm.schema.features import MISSING_ID, NUM_DENSE, NUM_SPARSE, OOV_ID
from dlrm.schema.splits import resolve_split
from dlrm.train.checkpoint import read_marker


def _lines(run, what):
    return [json.loads(x) for x in (run / what).read_text().splitlines() if x.startswith("{")]


def test_early_stopping_keeps_and_reports_the_best_checkpoint(small_dataset, tmp_path):
    run = tmp_path / "run"
    proc = dlrm("train", "--nproc-per-node", "2", *SMALL, f"--data.path={small_dataset}",
                "--run-dir", str(run), "--train.epochs=8", "--train.keep_best=true",
                "--train.early_stopping=2", "--optim.embedding_lr=0.3")
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    vals = [e for e in events if e["event"] == "eval" and e["split"] == "val"]
    *during, final = vals
    aucs = [e["auc"] for e in during]
    best = int(np.argmax(aucs))
    # Stopped after 2 validations without a better AUC, well before the 8 epochs ran out.
    assert len(during) == best + 3 and len(during) < 8
    (stop,) = [e for e in events if e["event"] == "early_stop"]
    assert stop["best_step"] == during[best]["step"] and stop["auc"] == aucs[best]
    marker = read_marker(run / "checkpoints" / "best")
    assert marker["position"]["step"] == during[best]["step"]
    # The final metrics are the best checkpoint's: val again exactly as it was, at its step.
    assert final["step"] == during[best]["step"]
    assert {k: v for k, v in final.items() if k != "step"} == \
        {k: v for k, v in during[best].items() if k != "step"}
    done = next(e for e in events if e["event"] == "done")
    assert done["early_stopped"] and not done["target_reached"]
    assert done["best"]["step"] == during[best]["step"] and done["val_auc"] == aucs[best]
    assert json.loads((run / "eval" / "test.json").read_text())["step"] == during[best]["step"]
    # Run again, it resumes from the last checkpoint and trains no further.
    again = dlrm("train", "--nproc-per-node", "2", *SMALL, f"--data.path={small_dataset}",
                 "--run-dir", str(run), "--train.epochs=8", "--train.keep_best=true",
                 "--train.early_stopping=2", "--optim.embedding_lr=0.3").stdout
    redone = [json.loads(x) for x in again.splitlines() if x.startswith("{")]
    assert next(e for e in redone if e["event"] == "done")["steps"] == done["steps"]
    assert not [e for e in redone if e["event"] == "train"]
    splits = next(e for e in events if e["event"] == "splits")
    assert splits["train"]["rows"] == 8000 and splits["val"]["rows"] == 2000
    # The launcher: one config error, said once, before torchrun starts any rank.
    bad = dlrm("train", "--nproc-per-node", "2", *SMALL, f"--data.path={small_dataset}",
               "--data.val_sources=[]", check=False)
    assert bad.returncode == 2 and bad.stderr.count("dlrm train: error") == 1
    assert "data.val_sources" in bad.stderr and "ChildFailedError" not in bad.stderr


def test_a_config_error_under_torchrun_is_said_once(small_dataset):
    from helpers import torchrun

    proc = torchrun(["-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}",
                     "--data.val_sources=[]"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("dlrm train: error: data.val_sources") == 1


# ------------------------------------------------------------------------ OOV dropout


def test_oov_dropout_draws_depend_on_seed_epoch_row_and_feature_only():
    rows = np.arange(100_000, dtype=np.int64)
    u = uniform(7, 1, rows, 3)
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(u[5000:6000], uniform(7, 1, rows[5000:6000], 3))
    for other in (uniform(8, 1, rows, 3), uniform(7, 2, rows, 3), uniform(7, 1, rows, 4)):
        assert abs(np.corrcoef(u, other)[0, 1]) < 0.02
    ids = np.where(rows % 10 == 0, MISSING_ID, rows % 50 + 2)
    bags = pa.ListArray.from_arrays(pa.array(np.arange(0, 200_001, 2, dtype=np.int32)),
                                    pa.array(np.repeat(ids, 2)))
    sparse = [ids.copy(), bags]
    drop_to_oov(sparse, rows, {0: 0.2, 1: 0.5}, 7, 1)
    dropped = sparse[0] == OOV_ID
    assert (sparse[0][ids == MISSING_ID] == MISSING_ID).all()  # missing stays missing
    assert abs(dropped.mean() / 0.9 - 0.2) < 0.01
    np.testing.assert_array_equal(dropped, (uniform(7, 1, rows, 0) < 0.2) & (ids != MISSING_ID))
    values = np.asarray(sparse[1].values).reshape(-1, 2)
    whole = (uniform(7, 1, rows, 1) < 0.5) & (ids != MISSING_ID)
    assert (values[whole] == OOV_ID).all() and (values[~whole] == ids[~whole, None]).all()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dropped_rows_are_the_same_split_across_ranks(tmp_path, world):
    lines = [tsv_row("0", ["0"] * NUM_DENSE, [f"{i:x}"] + ["1"] * (NUM_SPARSE - 1))
             for i in range(1000)]
    out = tmp_path / "data"
    m = preprocess([write_lines(tmp_path / "d", lines)], out, workers=1, log=lambda *_: None,
                   vocab_from=["*"])
    segments, features = resolve_split(out, m, ["*"]), m.features
    want = uniform(3, 2, np.arange(1000), 0) < 0.3
    assert 250 < want.sum() < 350
    for shuffle in (0, 64):
        got = np.zeros(1000, bool)
        for rank in range(world):
            batches = ParquetBatches(segments, 50, rank, world, shuffle_buffer=shuffle, seed=3,
                                     oov_dropout={0: 0.3}, prefetch=0, features=features)
            base = ParquetBatches(segments, 50, rank, world, shuffle_buffer=shuffle, seed=3,
                                  prefetch=0, features=features)
            for b, plain in zip(batches.iter_epoch(2), base.iter_epoch(2), strict=True):
                row = plain.sparse_features["C1"].values().numpy() - 2  # id - 2 = row
                got[row] = b.sparse_features["C1"].values().numpy() == OOV_ID
        np.testing.assert_array_equal(got, want)
