"""The DMP-sharded model on 2 gloo ranks against a single-process unsharded reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import torchrun

STEPS = 25


def test_sharded_training_matches_unsharded_reference(small_dataset: Path, tmp_path: Path):
    """Same initial weights, same global batches, plain SGD: same losses and final weights.

    Tables are spread over table-wise, column-wise (really split over both ranks) and
    table-column-wise sharding, so the all-to-all of every kind is on the path; dense
    parts run under DDP. The reference whose embedding gradients are summed rather than
    averaged over ranks must diverge: the check is sharp enough to see a wrong reduction.
    """
    out = tmp_path / "result.json"
    torchrun(["tests/dist_equivalence.py", str(small_dataset), str(out), str(STEPS), "mixed"])
    result = json.loads(out.read_text())

    assert "column_wise" in result["plan"] and "table_wise" in result["plan"]
    sharded = np.array(result["sharded"])
    assert sharded.shape == (STEPS,)
    reference = result["reference"]
    np.testing.assert_allclose(sharded, reference["losses"], rtol=0, atol=1e-5)
    assert reference["max_param_diff"] < 1e-5
    # Training moved the loss, so equal losses are not equal by accident.
    assert sharded[0] - sharded[-5:].mean() > 0.005

    control = result["summed_control"]
    assert np.abs(sharded - control["losses"]).max() > 3e-5
    assert control["max_param_diff"] > 1e-3
