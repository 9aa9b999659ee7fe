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


@pytest.fixture(scope="session")
def reloadable(trained, exported, tmp_path_factory):
    """Model directories to reload a server of ``exported`` with: an int8 export of the
    same checkpoint (the same requests, other predictions) and the predictions of the
    first 4 rows by it; and an fp32 export that answers requests with another label
    column (to be refused)."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from dlrm.serve.export import export
    from dlrm.serve.predict import predict

    _, rows, old_probs = exported
    tmp = tmp_path_factory.mktemp("reloadable")
    export(trained, tmp / "int8", "int8")
    (tmp / "rows.tsv").write_text("".join("\t".join(r) + "\n" for r in rows[:4]))
    predict(tmp / "int8", [tmp / "rows.tsv"], tmp / "new.parquet", options=None)
    new_probs = pq.read_table(tmp / "new.parquet").column("prob").to_numpy()
    assert not np.allclose(new_probs, old_probs[:4], rtol=0, atol=1e-6)  # tells them apart
    export(trained, tmp / "other")
    info = json.loads((tmp / "other" / "model.json").read_text())
    info["dataset"]["schema"]["label"] = "click"
    (tmp / "other" / "model.json").write_text(json.dumps(info))
    return tmp / "int8", new_probs, tmp / "other"
