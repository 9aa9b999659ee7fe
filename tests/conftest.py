from __future__ import annotations

from pathlib import Path

import pytest
from helpers import quiet, torchrun

from dlrm.preprocess.driver import preprocess
from dlrm.synth.criteo import synth


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic days of 4000 rows, preprocessed (vocab encoding)."""
    root = tmp_path_factory.mktemp("small")
    synth(root / "raw", days=3, rows_per_day=4000, seed=1)
    preprocess([root / "raw" / f"day_{d}" for d in range(3)], root / "data", workers=1,
               log=quiet)
    return root / "data"


SMALL = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--train.log_every=20",
         "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
         "--model.over_arch_layer_sizes=[16,1]", "--eval.batch_size=100"]


@pytest.fixture(scope="session")
def trained(small_dataset, tmp_path_factory) -> Path:
    """A tiny DLRM trained by 2 ranks on ``small_dataset``; returns its last checkpoint."""
    run = tmp_path_factory.mktemp("trained") / "run"
    torchrun(["-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}",
              "--run-dir", str(run)])
    return sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]


@pytest.fixture(scope="session")
def exported(trained, small_dataset, tmp_path_factory):
    """An fp32 export of ``trained``, the raw held-out day's first 300 rows as fields, and
    their predictions from `dlrm predict`."""
    import pyarrow.parquet as pq

    from dlrm.serve.export import export
    from dlrm.serve.predict import predict

    tmp = tmp_path_factory.mktemp("exported")
    export(trained, tmp / "model")
    raw = small_dataset.parent / "raw" / "day_2"
    predict(tmp / "model", [raw], tmp / "preds.parquet", options=None)
    probs = pq.read_table(tmp / "preds.parquet").column("prob").to_numpy()
    rows = [line.rstrip("\n").split("\t") for line in raw.open().readlines()[:300]]
    return tmp / "model", rows, probs
