"""What can be learned from a planted dataset's training days: the well-specified fit.

The Bayes AUC scores the planted model's true probabilities, and the seen-ids oracle
knows every weight of an id seen in training, even one seen once. Neither is reachable
by a learner, which must estimate each id's weight from its few rows. This fits the
planted model's own form by maximum a posteriori, on the training days, to convergence:

    logit = b + sum_f w_f[id_f] + sum_j c_j * x_j + sum_(f,g) <u_f[id_f], v_g[id_g]>

over the preprocessed ids and dense values, by full-batch L-BFGS, with the planted
model's own prior on the rows: each feature's weight scale and the latent vectors'
(L2 terms, so the fit is the posterior mode). It knows which features interact, that the
rest is first order, and how large each feature's weights are; a DLRM must find all of
that out. Its test AUC is a practical ceiling for any recipe on the
same rows: the gap to Bayes that no choice of learning rates can close.

Run:  .venv/bin/python scripts/well_specified.py runs/shapes/high
      (a ``bench_shapes.py`` shape directory: ``raw/truth.json`` and ``data/``)
Prints one JSON line and writes it to ``DIR/well_specified.json`` (read by bench_shapes):
the test AUC of the round (50 iterations each) with the best validation AUC, as a
recipe's run is judged.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dlrm.metrics import auc
from dlrm.schema.declared import load_schema
from dlrm.schema.manifest import Manifest, load_manifest
from dlrm.schema.splits import default_split_specs, resolve_split
from dlrm.synth.declared import PlantedModel

ROOT = Path(__file__).resolve().parent.parent
ROUND = 50  # L-BFGS iterations between checks of the validation AUC
MAX_ROUNDS = 8  # stop earlier once it moves by less than 1e-4


def _rows(data: Path, manifest: Manifest, specs: list[str]) -> pa.Table:
    """The rows of one split, in order."""
    return pa.concat_tables([pq.read_table(s.path).slice(s.start, s.stop - s.start)
                             for s in resolve_split(data, manifest, specs)])


def _tensors(table: pa.Table, manifest: Manifest) -> tuple[torch.Tensor, ...]:
    features = manifest.features
    ids = torch.from_numpy(np.stack([table.column(c).to_numpy().astype(np.int64)
                                     for c in features.sparse], 1))
    dense = torch.from_numpy(np.stack([table.column(c).to_numpy().astype(np.float32)
                                       for c in features.dense], 1))
    label = torch.from_numpy(table.column(features.label).to_numpy().astype(np.float32))
    return ids, dense, label


class Planted(torch.nn.Module):
    def __init__(self, cards: list[int], num_dense: int, pairs: list[tuple[int, int]]):
        super().__init__()
        self.first = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(c)) for c in cards)
        gen = torch.Generator().manual_seed(0)
        self.pairs = pairs
        latent = {f for p in pairs for f in p}
        self.latent = torch.nn.ParameterDict({
            str(f): torch.nn.Parameter(0.1 * torch.randn(cards[f], 4, generator=gen))
            for f in sorted(latent)})
        self.dense = torch.nn.Linear(num_dense, 1)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        logit = self.dense(dense).squeeze(1)
        for f, w in enumerate(self.first):
            logit = logit + w[ids[:, f]]
        for f, g in self.pairs:
            logit = logit + (self.latent[str(f)][ids[:, f]]
                             * self.latent[str(g)][ids[:, g]]).sum(1)
        return logit

    def penalty(self, first: list[float], latent: float) -> torch.Tensor:
        """The negative log prior: ``first[f]`` per squared weight of feature f,
        ``latent`` per squared latent coordinate."""
        terms = [c * w.square().sum() for c, w in zip(first, self.first, strict=True)]
        terms += [latent * u.square().sum() for u in self.latent.values()]
        return torch.stack(terms).sum()


def fit(shape_dir: Path) -> dict:
    data, truth = shape_dir / "data", json.loads((shape_dir / "raw" / "truth.json").read_text())
    manifest = load_manifest(data)
    specs = default_split_specs(manifest)
    train, val, test = (_tensors(_rows(data, manifest, specs[s]), manifest)
                        for s in ("train", "val", "test"))
    schema = load_schema(ROOT / "configs" / "schemas" / f"{truth['schema']}.toml")
    planted = PlantedModel(schema, truth["max_vocab"], truth["seed"], truth["signal"],
                           truth["interactions"])
    pairs = planted.pairs if truth["interactions"] else []
    rows = train[2].numel()
    # The planted prior, per row and on the mean loss: N(0, scale_f^2) per first-order
    # weight, N(0, 0.5^2) per latent coordinate, scaled by gamma's square root on each side.
    first_prior = [1 / (2 * s * s * rows) for s in planted.scale]
    latent_prior = 1 / (2 * 0.25 * max(truth["interactions"], 1e-9) * rows)
    model = Planted(manifest.cardinalities, train[1].shape[1], pairs)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=ROUND, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(train[0], train[1]), train[2]) + model.penalty(first_prior, latent_prior)
        loss.backward()
        return loss

    start, rounds, last = time.time(), [], None
    for _ in range(MAX_ROUNDS):
        loss = float(opt.step(closure))
        with torch.no_grad():
            scores = {name: auc(split[2].numpy(), model(split[0], split[1]).numpy())
                      for name, split in (("val", val), ("test", test))}
        rounds.append({"iterations": ROUND * (len(rounds) + 1), "objective": loss,
                       "val_auc": scores["val"], "test_auc": scores["test"],
                       "seconds": round(time.time() - start, 1)})
        print(json.dumps({"event": "round", **rounds[-1]}), file=sys.stderr, flush=True)
        if last is not None and abs(scores["val"] - last) < 1e-4:
            break
        last = scores["val"]
    best = max(rounds, key=lambda r: r["val_auc"])  # stopped early on validation
    return {"event": "well_specified", "test_auc": best["test_auc"], "val_auc": best["val_auc"],
            "iterations": best["iterations"],
            "bayes_auc": truth["splits"]["test"]["bayes_auc"], "pairs": pairs,
            "converged": len(rounds) < MAX_ROUNDS, "rounds": rounds}


def main() -> None:
    shape_dir = Path(sys.argv[1])
    out = fit(shape_dir)
    (shape_dir / "well_specified.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
