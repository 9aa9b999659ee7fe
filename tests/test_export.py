"""`dlrm export` and `dlrm predict`: a checkpoint of 2 ranks → a model directory that scores
raw rows in one process, as the checkpoint scores the preprocessed split."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, dlrm
from sklearn.metrics import roc_auc_score

from dlrm.errors import ExportError
from dlrm.rows.chunks import Options
from dlrm.serve.export import export
from dlrm.serve.model_dir import WEIGHTS, load_exported
from dlrm.serve.predict import predict

# Each precision's predictions of the test rows against the checkpoint's own (fp32), measured
# on the `trained` fixture: the largest difference of a row, the mean one, and that of the
# AUC were fp16 6.4e-5, 1.3e-5, 2.2e-5; int8 7.8e-4, 1.5e-4, 2.5e-5; int4 0.014, 0.0023,
# 1.5e-4 (fp32: 1.5e-8, 5e-9, 0). Allowed: about 4 times that.
ROW_TOLERANCE = {"fp32": 1e-6, "fp16": 2.5e-4, "int8": 3e-3, "int4": 0.06}
MEAN_TOLERANCE = {"fp32": 1e-7, "fp16": 5e-5, "int8": 6e-4, "int4": 0.01}
AUC_TOLERANCE = {"fp32": 1e-6, "fp16": 1e-4, "int8": 1e-4, "int4": 6e-4}


@pytest.fixture(scope="module")
def checkpoint_scores(trained, small_dataset, tmp_path_factory):
    """The checkpoint's own evaluation and scores of the test split (day_2's second half)."""
    tmp = tmp_path_factory.mktemp("scores")
    dlrm("evaluate", "--checkpoint", str(trained), "--data", str(small_dataset), "--out",
         str(tmp / "eval.json"))
    dlrm("score", "--checkpoint", str(trained), "--data", str(small_dataset), "--out",
         str(tmp / "scores.parquet"))
    return (json.loads((tmp / "eval.json").read_text())["metrics"],
            pq.read_table(tmp / "scores.parquet"))


@pytest.mark.parametrize("tables", ["fp32", "fp16", "int8", "int4"])
def test_an_export_scores_raw_rows_as_the_checkpoint(trained, small_dataset, checkpoint_scores,
                                                     tables, tmp_path):
    metrics, scores = checkpoint_scores
    model = tmp_path / "model"
    out = dlrm("export", "--checkpoint", str(trained), "--out", str(model), "--tables",
               tables).stdout
    size = json.loads(out.splitlines()[-1])["bytes"]
    raw = small_dataset.parent / "raw" / "day_2"
    summary = predict(model, [raw], tmp_path / "preds.parquet")
    assert summary["rows"] == 4000 and summary["rejected"] == 0
    preds = pq.read_table(tmp_path / "preds.parquet")
    assert preds.column_names == ["source", "line", "prob", "label"]
    assert preds.column("line").to_pylist() == list(range(1, 4001))
    test = preds.slice(2000)  # the run's test split: the day's second half
    np.testing.assert_array_equal(test.column("label").to_numpy(),
                                  scores.column("label").to_numpy())
    auc = roc_auc_score(test.column("label").to_numpy(), test.column("prob").to_numpy())
    diff = np.abs(test.column("prob").to_numpy() - scores.column("prob").to_numpy())
    print(f"{tables}: test AUC {auc:.6f} (checkpoint {metrics['auc']:.6f}), {size} bytes, "
          f"row diff max {diff.max():.3g} mean {diff.mean():.3g}")
    assert diff.max() <= ROW_TOLERANCE[tables], diff.max()  # row for row
    assert diff.mean() <= MEAN_TOLERANCE[tables], diff.mean()
    assert auc == pytest.approx(metrics["auc"], abs=AUC_TOLERANCE[tables])


def test_export_sizes_shrink_with_precision(small_dataset, tmp_path):
    """fp32 > fp16 > int8 > int4. TorchRec pads each quantized row to 16 bytes: at the
    fixture's 8 dimensions fp16, int8 (8 + scale and bias) and int4 rows are all 16 bytes,
    so the order shows from 32 dimensions (64, 48 and 32 bytes a row). Shapes, not values,
    set the sizes: one training step makes the checkpoint."""
    run = tmp_path / "run"
    dlrm("train", "--config", "configs/tiny.toml", f"--data.path={small_dataset}",
         "--run-dir", str(run), "--data.batch_size=64", "--train.limit_train_batches=1",
         "--model.embedding_dim=32", "--model.dense_arch_layer_sizes=[32]",
         "--model.over_arch_layer_sizes=[8,1]", "--data.prefetch=0")
    (checkpoint,) = (run / "checkpoints").glob("step-*[0-9]")
    sizes = {}
    for tables in ("fp32", "fp16", "int8", "int4"):
        export(checkpoint, tmp_path / tables, tables)
        sizes[tables] = (tmp_path / tables / WEIGHTS).stat().st_size
    print(sizes)
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"], sizes
    assert sizes["fp32"] > 1.7 * sizes["fp16"], sizes  # tables are most of the model


def test_predict_numbers_lines_and_rejects_across_chunks_and_workers(trained, small_dataset,
                                                                     tmp_path):
    export(trained, tmp_path / "model")
    clean = (small_dataset.parent / "raw" / "day_2").read_text().splitlines(keepends=True)[:600]
    bad = {5: "\n", 77: "1\tx" + "\t1" * 38 + "\n", 300: "0\t1\t2\n"}  # blank, bad dense, short
    lines, good = [], []
    for line in clean:
        if len(lines) + 1 in bad:
            lines.append(bad[len(lines) + 1])
        lines.append(line)
        good.append(len(lines))
    (tmp_path / "mixed.tsv").write_text("".join(lines))
    a = predict(tmp_path / "model", [tmp_path / "mixed.tsv"], tmp_path / "a.parquet",
                options=Options(workers=2, chunk_bytes=20_000))
    predict(tmp_path / "model", [small_dataset.parent / "raw" / "day_2"],
            tmp_path / "b.parquet", options=Options(workers=1))
    assert a["workers"] == 2 and a["rows"] == 600
    assert a["rejected_by_reason"] == {"bad_dense": 1, "empty_line": 1, "wrong_field_count": 1}
    got = pq.read_table(tmp_path / "a.parquet")
    assert got.column("line").to_pylist() == good
    assert set(got.column("source").to_pylist()) == {"mixed"}
    want = pq.read_table(tmp_path / "b.parquet").column("prob").to_numpy()[:600]
    np.testing.assert_allclose(got.column("prob").to_numpy(), want, rtol=0, atol=1e-6)
    rejects = (tmp_path / "a.parquet.rejects.tsv").read_text().splitlines()
    assert [r.split("\t")[:3] for r in rejects] == [
        ["mixed", "5", "empty_line"], ["mixed", "77", "bad_dense"],
        ["mixed", "300", "wrong_field_count"]]


def test_a_model_directory_loads_alone_and_unpickles_nothing(trained, tmp_path):
    export(trained, tmp_path / "model", "int8")
    # A fresh process, no process group: it loads and scores.
    code = ("import torch, dlrm.serve.model_dir as e; m = e.load_exported('model'); "
            "assert not torch.distributed.is_initialized(); print(m.info['tables'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "int8"
    # Weights that would unpickle an object are refused, not run.
    torch.save({"evil": pickle.loads(pickle.dumps(Options()))}, tmp_path / "model" / WEIGHTS)
    with pytest.raises(ExportError, match="weights.pt"):
        load_exported(tmp_path / "model")
    (tmp_path / "model" / "model.json").write_text("{")
    with pytest.raises(ExportError, match="model.json: corrupt"):
        load_exported(tmp_path / "model")
    with pytest.raises(ExportError, match="not empty"):
        export(trained, tmp_path / "model")


def test_rerunning_an_export_over_its_own_directory_does_nothing(trained, tmp_path):
    """A rerun of the same command (after a kill that came once the directory was in
    place) finds it complete; another export into it is refused."""
    out = tmp_path / "model"
    info = export(trained, out, "fp16")
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
             if p.is_file()}
    assert export(trained, out, "fp16") == info
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
            if p.is_file()} == files
    with pytest.raises(ExportError, match="not empty"):
        export(trained, out, "int8")


def test_rows_without_the_label_column_are_scored_alike(trained, small_dataset, tmp_path):
    """Criteo's unlabeled layout (39 fields, as Kaggle's test.txt): the same probabilities,
    no label column."""
    export(trained, tmp_path / "model")
    lines = (small_dataset.parent / "raw" / "day_2").read_text().splitlines()[:500]
    (tmp_path / "labeled.tsv").write_text("".join(x + "\n" for x in lines))
    (tmp_path / "unlabeled.tsv").write_text("".join(x.split("\t", 1)[1] + "\n" for x in lines))
    for name in ("labeled", "unlabeled"):
        predict(tmp_path / "model", [tmp_path / f"{name}.tsv"], tmp_path / f"{name}.parquet",
                options=Options(workers=1))
    a, b = (pq.read_table(tmp_path / f"{n}.parquet") for n in ("labeled", "unlabeled"))
    assert b.column_names == ["source", "line", "prob"] and b.num_rows == 500
    np.testing.assert_allclose(b.column("prob").to_numpy(), a.column("prob").to_numpy(),
                               rtol=0, atol=1e-6)
