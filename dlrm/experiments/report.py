"""``dlrm report RUN_DIR``: PNG plots of a run and one Markdown page that shows them.

From ``RUN/metrics.jsonl``: training loss and evaluation AUC over steps. From the last
evaluation (``RUN/eval/test.json``, else ``val.json``, written by training's final
evaluation or ``dlrm evaluate --out``): the ROC curve and the calibration (reliability)
curve. Everything lands in ``RUN/report/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from dlrm.utils.files import atomic_path, atomic_write_text  # noqa: E402


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {run} a run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
    return records


def _last_eval(run: Path) -> dict[str, Any] | None:
    for split in ("test", "val"):
        path = run / "eval" / f"{split}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def headline(records: list[dict[str, Any]]) -> str:
    """A binary label's runs are judged by AUC, a regression label's by RMSE."""
    return "rmse" if any("eval/val/rmse" in r or "eval/test/rmse" in r for r in records) \
        else "auc"


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _regression_figures(last: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Predicted against actual, and the residuals, of a regression's final evaluation."""
    m, curves, split = last["metrics"], last["curves"], last["split"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    sample, binned = curves["sample"], curves["binned"]
    ax.scatter(sample["label"], sample["prediction"], s=4, alpha=0.25, label="rows (sample)")
    ax.plot(binned["observed"], binned["predicted"], marker="o", ms=3, c="C1",
            label="bins by prediction (mean label, mean prediction)")
    lo = min(sample["label"] + sample["prediction"], default=0.0)
    hi = max(sample["label"] + sample["prediction"], default=1.0)
    ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=0.8, label="perfect")
    ax.set(xlabel="actual", ylabel="predicted",
           title=f"Predicted vs actual ({split}, RMSE {m['rmse']:.4f})")
    ax.legend(loc="upper left", fontsize=7)
    save_figure(fig, out / "predicted.png")
    res = curves["residuals"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    edges = res["edges"]
    ax.bar(edges[:-1], res["counts"], width=np.diff(edges),
           align="edge")
    ax.set(xlabel="residual (predicted - actual)", ylabel="rows",
           title=f"Residuals ({split}, MAE {m['mae']:.4f})")
    save_figure(fig, out / "residuals.png")
    return [(f"Predicted vs actual ({split})", "predicted.png"),
            (f"Residuals ({split})", "residuals.png")]


def report(run: str | Path) -> Path:
    """Writes the plots and ``RUN/report/index.md``; returns the page's path."""
    run = Path(run)
    records = read_metrics(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    figures: list[tuple[str, str]] = []

    steps, loss = series(records, "train/loss")
    metric = headline(records)
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, loss, lw=1.2)
        kind = "squared error" if metric == "rmse" else "log loss"
        ax.set(xlabel="step", ylabel=f"{kind} (window mean)", title="Training loss")
        ax.grid(alpha=0.3)
        save_figure(fig, out / "loss.png")
        figures.append(("Training loss", "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    plotted = False
    for split in ("val", "test"):
        s, a = series(records, f"eval/{split}/{metric}")
        if s:
            ax.plot(s, a, marker="o", ms=3, label=split)
            plotted = True
    if plotted:
        name = metric.upper()
        ax.set(xlabel="step", ylabel=name, title=f"Evaluation {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, out / f"{metric}.png")
        figures.append((f"Evaluation {name}", f"{metric}.png"))
    else:
        plt.close(fig)

    last = _last_eval(run)
    rows = []
    if last is not None and last.get("curves") and "binned" in last["curves"]:
        figures += _regression_figures(last, out)
    elif last is not None and last.get("curves"):
        m, curves, split = last["metrics"], last["curves"], last["split"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(curves["roc"]["fpr"], curves["roc"]["tpr"], lw=1.5,
                label=f"AUC {m['auc']:.4f}")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC ({split}, step {last['step']})")
        ax.legend(loc="lower right")
        save_figure(fig, out / "roc.png")
        cal = curves["calibration"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        top = max(max(cal["predicted"]), max(cal["observed"])) * 1.05
        ax.plot([0, top], [0, top], ls="--", c="grey", lw=0.8, label="perfect")
        ax.plot(cal["predicted"], cal["observed"], marker="o", ms=3,
                label=f"predicted/observed CTR {m['calibration']:.3f}")
        ax.set(xlabel="mean predicted probability", ylabel="observed click rate",
               title=f"Calibration ({split}, {len(cal['rows'])} equal-count bins)")
        ax.legend(loc="upper left")
        save_figure(fig, out / "calibration.png")
        figures += [(f"ROC curve ({split})", "roc.png"),
                    (f"Calibration ({split})", "calibration.png")]
    if last is not None:
        rows = [f"| {k} | {v:.6f} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in last["metrics"].items()]

    lines = [f"# Run report: {run.name}", ""]
    done = [r for r in records if "train/samples_per_sec" in r]
    if steps:
        lines.append(f"{steps[-1]} steps; last training loss {loss[-1]:.4f}; "
                     f"{done[-1]['train/samples_per_sec']:.0f} samples/s (last window).")
        lines.append("")
    if rows:
        lines += [f"## Final evaluation: {last['split']} (step {last['step']})", "",
                  "| metric | value |", "|---|---|", *rows, ""]
    for path in sorted((run / "eval").glob("ranking-*.json")):  # dlrm evaluate --ranking
        r = json.loads(path.read_text())
        lines += [f"## Ranking: {r['split']} (step {r['step']})", "",
                  f"{r['protocol']}; relevant: {r['relevant']}.", "",
                  "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.6f} |" if isinstance(v, float) else f"| {k} | {v} |"
                    for k, v in r["metrics"].items()), ""]
    for title, png in figures:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    page = out / "index.md"
    atomic_write_text(page, "\n".join(lines))
    return page
