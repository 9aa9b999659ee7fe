"""Planted datasets of different shapes (where the signal sits, the tail, the
interactions), Criteo's layout included, for tuning recipes across them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import dlrm

from dlrm.schema.declared import load_schema
from dlrm.synth.declared import PlantedModel


def _weight_scales(signal: str) -> list[float]:
    """The planted weights' scale on the smallest (10 ids) and largest (1M) vocabulary."""
    model = PlantedModel(load_schema("criteo"), 1_000_000, 0, signal)
    order = np.argsort(model.sizes)
    assert model.sizes[order[0]] == 10 and model.sizes[order[-1]] == 1_000_000
    big = model.weights[order[-1]]
    assert big.std() == pytest.approx(model.scale[order[-1]], rel=0.01)
    return [model.scale[order[0]], model.scale[order[-1]]]


def test_signal_sits_where_the_shape_says():
    small, large = _weight_scales("high")
    assert large == pytest.approx(6 * small)  # real logs: user, ad and device ids
    small, large = _weight_scales("low")
    assert small == pytest.approx(6 * large)
    small, large = _weight_scales("even")
    assert small == pytest.approx(large)


def test_criteo_schema_synth_is_planted_and_preprocesses(tmp_path):
    out = dlrm("synth", "--schema", "criteo", "--out", str(tmp_path / "raw"), "--days", "2",
               "--rows-per-day", "3000", "--max-vocab", "1000", "--signal", "low",
               "--interactions", "0").stdout
    truth = json.loads((tmp_path / "raw" / "truth.json").read_text())
    assert truth["signal"] == "low" and truth["interactions"] == 0.0
    assert 0.6 < json.loads(out)["test"]["bayes_auc"] < 1
    dlrm("preprocess", "--input", str(tmp_path / "raw" / "day_0.tsv"),
         str(tmp_path / "raw" / "day_1.tsv"), "--out", str(tmp_path / "data"))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["rows_accepted"] == 6000 and manifest["rows_rejected"] == 0
    assert len(manifest["cardinalities"]) == 26


def test_interactions_change_the_planted_labels(tmp_path):
    auc = {}
    for strength in ("0", "2"):
        out = dlrm("synth", "--schema", "avazu", "--out", str(tmp_path / strength), "--days",
                   "1", "--rows-per-day", "4000", "--max-vocab", "300", "--interactions",
                   strength).stdout
        auc[strength] = json.loads(out)["test"]["bayes_auc"]
    assert auc["2"] > auc["0"] + 0.02  # a strong pairwise term is signal too


def test_unknown_signal_is_refused(tmp_path):
    with pytest.raises(ValueError, match="signal"):
        PlantedModel(load_schema("avazu"), 100, 0, "middle")


def test_seen_oracle_bounds_what_training_can_reach(tmp_path):
    """The oracle that knows the weights of the ids seen in training: below Bayes, and
    closer to it the more training days there are (fewer test ids it has never seen)."""
    gap = {}
    for days in (2, 8):
        out = dlrm("synth", "--schema", "avazu", "--out", str(tmp_path / str(days)), "--days",
                   str(days), "--rows-per-day", "10000", "--max-vocab", "100000").stdout
        test = json.loads(out)["test"]
        assert 0.5 < test["seen_oracle_auc"] < test["bayes_auc"]
        gap[days] = test["bayes_auc"] - test["seen_oracle_auc"]
    assert gap[8] < gap[2] - 0.01


def test_a_schema_of_bags_only_plants_and_its_oracle_knows_the_bags(tmp_path):
    """Bags are known whole to the oracle: with nothing else, it is the Bayes model."""
    schema = tmp_path / "bags.toml"
    schema.write_text('[input]\nformat = "csv"\nheader = true\n[label]\ncolumn = "click"\n'
                      '[categorical]\ncolumns = ["tags"]\n'
                      '[categorical.per_feature.tags]\nseparator = "|"\n')
    out = dlrm("synth", "--schema", str(schema), "--out", str(tmp_path / "raw"), "--days", "2",
               "--rows-per-day", "2000").stdout
    test = json.loads(out)["test"]
    assert test["seen_oracle_auc"] == pytest.approx(test["bayes_auc"])


def test_criteo_growth_grows_distinct_values_as_criteo_does():
    """`--criteo-growth`: each large feature's distinct values follow its Heaps' law
    (within 12%), the largest growing fastest (C3: rows ** 0.74), the small ones not at
    all."""
    import pyarrow.compute as pc

    from dlrm.synth.criteo import CAT_MISSING, ClickModel, generate_day
    from dlrm.synth.growth import expected_distinct, growth_exponent

    model = ClickModel.from_seed(0)
    distinct = {}
    for rows in (100_000, 400_000):
        table, prob = generate_day(model, 0, 0, rows, growth=True)
        assert 0.1 < prob.mean() < 0.5  # the click model still reads every value
        distinct[rows] = [pc.count_distinct(table[f"C{f + 1}"]).as_py() for f in range(26)]
    for f in (2, 11, 15, 20, 3, 23):  # the largest six
        seen = distinct[400_000][f]
        want = expected_distinct(f, 400_000 * (1 - CAT_MISSING[f]))
        assert abs(seen / want - 1) < 0.12, (f, seen, want)
    growth = np.log(distinct[400_000][2] / distinct[100_000][2]) / np.log(4)
    # Nearly: at these sizes most of C3's values are still new (see synth_growth).
    assert 0 < growth - growth_exponent(2) < 0.12 and growth_exponent(2) > 0.7
    assert distinct[400_000][8] == distinct[100_000][8] == 3  # C9: three values, always
