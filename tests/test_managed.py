"""Managed-collision features (a schema's ``encoding = "managed"``): raw ids hashed in
preprocessing with no counting pass, mapped to rows by TorchRec's managed-collision modules
inside the model; trained on 1 and 2 gloo ranks (row-wise, the fused kernel), resumed
exactly after a SIGKILLed rank, exported to score raw rows and requests as the ranks
scored them; what cannot hold (another world size, row-wise Adagrad on CPU) refused by
name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import Server, checkpoint_tensors, dlrm, quiet, torchrun, train_killing_a_rank

from dlrm.errors import SchemaError
from dlrm.preprocess.driver import preprocess
from dlrm.schema.declared import SCHEMAS, load_schema
from dlrm.synth.criteo import synth

SIZE = 2048
TINY = ["--config", "configs/tiny.toml", "--train.log_every=50", "--model.embedding_dim=8",
        "--model.dense_arch_layer_sizes=[16,8]", "--model.over_arch_layer_sizes=[16,1]",
        "--eval.batch_size=1000", "--data.prefetch=0"]
RAW_IDS = ("/model/model.sparse_arch.embedding_bag_collection._managed_collision_collection."
           "_managed_collision_modules.t_{}._mch_sorted_raw_ids")


def _schema(tmp: Path, encoding: str = 'encoding = "managed"\nsize = 2048') -> Path:
    text = (SCHEMAS / "criteo.toml").read_text().replace('encoding = "vocab"', encoding)
    path = tmp / "managed.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("managed")
    synth(root / "raw", days=3, rows_per_day=20_000, seed=2)
    raw = [root / "raw" / f"day_{d}" for d in range(3)]
    preprocess(raw, root / "managed", workers=1, log=quiet, schema=load_schema(_schema(root)))
    preprocess(raw, root / "vocab", workers=1, log=quiet)
    return root


def _expected_ids(field: str) -> int:
    """A raw hex value's managed id, by the rule written out: its 64-bit value times the
    golden-ratio constant (mod 2**64), folded into [2, 2**63 - 1)."""
    if not field:
        return 0
    return (int(field, 16) * 0x9E3779B97F4A7C15 % 2**64) % (2**63 - 3) + 2


def test_preprocessing_hashes_raw_ids_and_counts_nothing(days):
    data = days / "managed"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["encoding"] == {"type": "managed", "size": SIZE, "eviction": "lfu"}
    assert manifest["cardinalities"] == [SIZE] * 26
    assert not (data / "vocab.npz").exists() and "vocab_from" not in manifest
    first = manifest["sources"][0]["files"][0]
    got = pq.read_table(data / first["path"], columns=["C3", "C20"])
    lines = (days / "raw" / "day_0").read_text().splitlines()[:first["rows"]]
    fields = [line.split("\t") for line in lines]
    for name, col in (("C3", 14 + 2), ("C20", 14 + 19)):
        want = np.array([_expected_ids(f[col]) for f in fields], np.int64)
        np.testing.assert_array_equal(got.column(name).to_numpy(), want)
        assert (want == 0).any() or name == "C3"  # C20 is often missing: id 0
    assert got.column("C3").to_numpy().max() > 2**62  # spread over the whole range
    assert '"bad_files": 0' in dlrm("verify", str(data)).stdout
    # Planned for a cluster as trained: row-wise over every rank, the fused kernel.
    plan = dlrm("plan", "--config", "configs/tiny.toml", f"--data.path={data}",
                "--world-size", "4").stdout
    assert "t_C26 | row_wise      | fused          | [0, 1, 2, 3]" in plan


def test_managed_is_every_feature_or_none_and_sized(tmp_path):
    mixed = (SCHEMAS / "criteo.toml").read_text() + (
        '\n[categorical.per_feature.C1]\nencoding = "managed"\nsize = 100\n')
    (tmp_path / "mixed.toml").write_text(mixed)
    with pytest.raises(SchemaError, match="every categorical feature or none"):
        load_schema(tmp_path / "mixed.toml")
    with pytest.raises(SchemaError, match="size: a managed table needs its rows"):
        load_schema(_schema(tmp_path, 'encoding = "managed"'))


def test_managed_tables_train_admit_ids_and_score_like_a_vocabulary(days, tmp_path):
    runs = {}
    for name in ("managed", "vocab"):
        out = dlrm("train", *TINY, "--data.batch_size=256", f"--data.path={days / name}",
                   "--run-dir", str(tmp_path / name)).stdout
        runs[name] = [json.loads(x) for x in out.splitlines()
                      if x.startswith('{"event": "done"')][0]
    # The planted signal is learnt: as well as with exact vocabularies (whose tables
    # hold every value; 2048 rows a feature here), within noise.
    assert runs["managed"]["test_auc"] > 0.72
    assert runs["managed"]["test_auc"] > runs["vocab"]["test_auc"] - 0.02, runs
    (ck,) = sorted((tmp_path / "managed" / "checkpoints").glob("step-*"))
    tensors = checkpoint_tensors(ck, tmp_path)
    admitted = tensors[RAW_IDS.format("C3")]
    admitted = admitted[admitted < torch.iinfo(torch.int64).max]
    assert SIZE // 2 < admitted.numel() <= SIZE  # C3 has more values than rows: full
    seen = pq.read_table(days / "managed" / "data" / "day_0").column("C3").to_numpy()
    assert np.isin(admitted.numpy(), seen).mean() > 0.5  # ids of the training rows


def test_two_ranks_row_wise_resume_exactly_and_refuse_what_cannot_hold(days, tmp_path):
    common = [*TINY, "--data.batch_size=128", f"--data.path={days / 'managed'}",
              "--train.checkpoint_every=10", "--train.keep_checkpoints=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    torchrun(["-m", "dlrm", "train", *common, "--run-dir", str(whole)])
    plan = (whole / "plan.txt").read_text()
    assert "t_C1  | row_wise      | fused" in plan
    out = train_killing_a_rank(common, killed, "step-000000010")
    starts = [json.loads(x) for x in out.splitlines() if '"event": "start"' in x]
    assert len(starts) == 2 and starts[1]["resumed_from"]
    a, b = (sorted((run / "checkpoints").glob("step-*[0-9]"))[-1] for run in (whole, killed))
    assert a.name == b.name
    ta, tb = checkpoint_tensors(a, tmp_path), checkpoint_tensors(b, tmp_path)
    assert ta.keys() == tb.keys() and RAW_IDS.format("C1") in ta
    for key in ta:  # tables, optimizer state and every collision module's buffers
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-5, atol=1e-6, msg=key)

    refused = [
        (["evaluate", "--checkpoint", str(a), "--data", str(days / "managed")],
         "loads on 2 ranks only"),
        (["train", *TINY, f"--data.path={days / 'managed'}", "--run-dir",
          str(tmp_path / "rw"), "--optim.embedding_optimizer=rowwise_adagrad"],
         "rowwise_adagrad cannot train managed tables on CPU"),
        (["train", *TINY, f"--data.path={days / 'managed'}", "--run-dir",
          str(tmp_path / "one"), "--init-from", str(a)], "loads on 2 ranks only"),
    ]
    for args, says in refused:
        proc = dlrm(*args, check=False)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr[-1500:])

    # Exported, the model scores raw rows as the 2 ranks scored the test split: ids with
    # rows through the modules' lookup, the others through their rank's reserved row.
    dlrm("export", "--checkpoint", str(a), "--out", str(tmp_path / "model"))
    torchrun(["-m", "dlrm", "score", "--checkpoint", str(a), "--data", str(days / "managed"),
              "--split", "test", "--out", str(tmp_path / "score.parquet")])
    scored = pq.read_table(tmp_path / "score.parquet").sort_by("row")
    lines = (days / "raw" / "day_2").read_text().splitlines()[10_000:]  # the test half
    (tmp_path / "test.tsv").write_text("\n".join(lines) + "\n")
    dlrm("predict", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "test.tsv"),
         "--out", str(tmp_path / "predict.parquet"))
    predicted = pq.read_table(tmp_path / "predict.parquet").column("prob").to_numpy()
    want = scored.column("prob").to_numpy()
    assert predicted.size == want.size == 10_000
    np.testing.assert_allclose(predicted, want, rtol=0, atol=1e-5)
    rows = [line.split("\t") for line in lines[:100]]
    server = Server(tmp_path / "model")
    try:  # a few rows (the per-row path) and many (the columnar one)
        few = server.post("/predict", {"rows": rows[:8]})[1]["predictions"]
        many = server.post("/predict", {"rows": rows})[1]["predictions"]
    finally:
        server.stop()
    np.testing.assert_allclose(few, want[:8], rtol=0, atol=1e-5)
    np.testing.assert_allclose(many, want[:100], rtol=0, atol=1e-5)
