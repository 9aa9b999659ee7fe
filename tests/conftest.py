from __future__ import annotations

from pathlib import Path

import pytest
from helpers import quiet

from dlrm.data.preprocess import preprocess
from dlrm.data.synth import synth


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic days of 4000 rows, preprocessed (vocab encoding)."""
    root = tmp_path_factory.mktemp("small")
    synth(root / "raw", days=3, rows_per_day=4000, seed=1)
    preprocess([root / "raw" / f"day_{d}" for d in range(3)], root / "data", workers=1,
               log=quiet)
    return root / "data"
