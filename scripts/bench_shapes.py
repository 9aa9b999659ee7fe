"""Recipes on planted data nobody tuned them on: test AUC against the Bayes AUC.

Run:  .venv/bin/python scripts/bench_shapes.py [--recipe configs/criteo_1tb.toml]
          [--shapes high low even] [--days 24] [--rows-per-day 50000] [--work DIR]
          [--nproc 2] [--batch-size 512] [--label L] [--schema criteo]
          [-- --optim.embedding_lr=0.05 ...]

Another layout: ``--schema avazu --recipe configs/avazu.toml --days 3 --rows-per-day
100000 --work runs/shapes_avazu`` (a schema with a time column is held out on its last
period's halves, the rows synth scores).

For each shape it writes (once; kept in ``--work``) a planted dataset with
``dlrm synth --schema SCHEMA`` (Criteo's by default) and preprocesses it, then trains
the recipe for one epoch on ``--nproc`` ranks with ``--batch-size`` per rank, tables
sized by the dataset (not the recipe's 40M rows) and the overrides after ``--``, and
prints the test AUC, the planted model's Bayes AUC on the same rows and the gap, and
beside them the seen-ids oracle and, where ``scripts/well_specified.py`` has been run on
the shape, the test AUC of the planted model's own form fitted to the training days. Shapes
(``dlrm.synth.declared``):

- ``high``: the signal in the largest vocabularies (up to 1M ids, long Zipf tails),
  interactions 0.5, seed 0 (the shape of real logs);
- ``low``: the signal in the smallest vocabularies, vocabularies up to 100k, interactions
  1.0, seed 1;
- ``even``: the same weight scale for every feature, vocabularies up to 1M, no pairwise
  interactions, seed 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from dlrm.schema.manifest import load_manifest
from dlrm.schema.splits import default_split_specs

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "high": {"signal": "high", "max_vocab": 1_000_000, "interactions": 0.5, "seed": 0},
    "low": {"signal": "low", "max_vocab": 100_000, "interactions": 1.0, "seed": 1},
    "even": {"signal": "even", "max_vocab": 1_000_000, "interactions": 0.0, "seed": 2},
}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def dataset(work: Path, schema: str, shape: str, days: int, rows: int,
            ) -> tuple[Path, dict[str, float]]:
    """The shape's preprocessed dataset and its test split's truth (Bayes and oracle)."""
    s = SHAPES[shape]
    raw, data = work / shape / "raw", work / shape / "data"
    truth = raw / "truth.json"
    if not truth.exists():
        _run([sys.executable, "-m", "dlrm", "synth", "--schema", schema, "--out", str(raw),
              "--days", str(days), "--rows-per-day", str(rows), "--seed", str(s["seed"]),
              "--max-vocab", str(s["max_vocab"]), "--signal", s["signal"],
              "--interactions", str(s["interactions"])])
    if not (data / "manifest.json").exists():
        suffix = ".tsv" if schema == "criteo" else ".csv"
        _run([sys.executable, "-m", "dlrm", "preprocess", "--schema", schema, "--input",
              *(str(raw / f"day_{d}{suffix}") for d in range(days)), "--out", str(data)])
    return data, json.loads(truth.read_text())["splits"]["test"]


def default_splits(data: Path) -> list[str]:
    """With a time column, overrides that set the default split (the last period's
    halves: the rows synth scores) whatever the recipe's."""
    manifest = load_manifest(data)
    if manifest.periods is None:
        return []
    return [f"--data.{split}_sources={json.dumps(specs)}"
            for split, specs in default_split_specs(manifest).items()]


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="configs/criteo_1tb.toml")
    ap.add_argument("--schema", default="criteo",
                    help="the planted layout (a name in configs/schemas/), with --recipe")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--days", type=int, default=24)
    ap.add_argument("--rows-per-day", type=int, default=50_000)
    ap.add_argument("--work", default="runs/shapes")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--label", default="", help="names the runs (run-RECIPE-LABEL)")
    args = ap.parse_args(argv)
    work = ROOT / args.work
    rows = []
    for shape in args.shapes:
        data, truth = dataset(work, args.schema, shape, args.days, args.rows_per_day)
        bayes, oracle = truth["bayes_auc"], truth.get("seen_oracle_auc", float("nan"))
        run = work / shape / f"run-{Path(args.recipe).stem}{'-' + args.label if args.label else ''}"
        shutil.rmtree(run, ignore_errors=True)  # a measurement starts afresh, never resumes
        out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={args.nproc}", "-m", "dlrm", "train", "--config",
                    args.recipe, f"--data.path={data}", "--run-dir", str(run),
                    f"--data.batch_size={args.batch_size}", "--train.epochs=1",
                    "--model.num_embeddings_per_feature=[]",
                    "--train.checkpoint_every=0", *default_splits(data), *overrides])
        (done,) = [json.loads(x) for x in out.splitlines() if '"event": "done"' in x]
        fit = work / shape / "well_specified.json"  # scripts/well_specified.py, if run
        reference = json.loads(fit.read_text())["test_auc"] if fit.exists() else float("nan")
        rows.append((shape, done["test_auc"], bayes, oracle, reference))
        print(json.dumps({"event": "shape", "shape": shape, "test_auc": done["test_auc"],
                          "bayes_auc": round(bayes, 6), "seen_oracle_auc": round(oracle, 6),
                          "gap": round(bayes - done["test_auc"], 6)}), flush=True)
    print(f"\n{args.recipe} on {args.schema} {' '.join(overrides)}")
    print("| shape | test AUC | Bayes AUC | gap | seen-ids oracle | well-specified fit |\n"
          "|---|---|---|---|---|---|")
    for shape, got, bayes, oracle, reference in rows:
        print(f"| {shape} | {got:.4f} | {bayes:.4f} | {bayes - got:.4f} | {oracle:.4f} | "
              f"{reference:.4f} |")


if __name__ == "__main__":
    main()
