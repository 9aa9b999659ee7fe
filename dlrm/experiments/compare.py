"""``dlrm report RUN_A RUN_B ...``: several runs on one page.

Their training loss and evaluation metric (AUC, or RMSE for a regression label) over
steps, each plot overlaying every run; a table of each run's final evaluation and speed;
and a table of the config keys whose values differ between the runs (from each run's
``config.toml``). Everything lands in ``OUT`` (default: the runs' common parent's
``report/``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from dlrm.experiments.report import headline, read_metrics, save_figure, series
from dlrm.utils.files import atomic_write_text


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_of(run: Path) -> dict[str, Any]:
    """A run's config as ``section.key`` → value; empty when it has no config.toml."""
    path = run / "config.toml"
    if not path.is_file():
        return {}
    try:
        return _flat(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not a TOML file: {e}") from None


def final_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of every evaluation metric and the last training figures."""
    last: dict[str, Any] = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and value is not None:
                last[key] = value
        if any(k.startswith("eval/") for k in r):
            last["step"] = r["step"]
    return last


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def compare(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Writes the overlay plots and ``OUT/index.md`` for ``runs``; returns the page's path.

    Raises:
        ValueError: a run without ``metrics.jsonl``, or runs that share a name.
    """
    runs = [Path(r) for r in runs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r) for r in runs]
    records = {name: read_metrics(run) for name, run in zip(names, runs, strict=True)}
    if out is None:
        out = Path(os.path.commonpath([r.resolve() for r in runs])) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = headline([r for rs in records.values() for r in rs])
    figures = []
    for key, title, png in [("train/loss", "Training loss", "loss.png"),
                            (f"eval/val/{metric}", f"Validation {metric.upper()}",
                             f"val_{metric}.png"),
                            (f"eval/test/{metric}", f"Test {metric.upper()}",
                             f"test_{metric}.png")]:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for name, rs in records.items():
            steps, values = series(rs, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None, ms=3,
                        lw=1.2, label=name)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set(xlabel="step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save_figure(fig, out / png)
        figures.append((title, png, drawn))

    finals = {name: final_metrics(rs) for name, rs in records.items()}
    columns = [f"eval/val/{metric}", f"eval/test/{metric}", "eval/val/logloss",
               "eval/test/logloss", "step", "train/samples_per_sec"]
    columns = [c for c in columns if any(c in f for f in finals.values())]
    lines = [f"# Runs compared: {len(runs)}", "",
             "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(f.get(c)) for c in columns) + " |"
              for name, f in finals.items()]
    configs = {name: config_of(run) for name, run in zip(names, runs, strict=True)}
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1
              and k != "data.path"]
    lines += ["", "## Config differences", ""]
    if differ:
        lines += ["| run | " + " | ".join(differ) + " |", "|---" * (len(differ) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_cell(c.get(k)) for k in differ) + " |"
                  for name, c in configs.items()]
    else:
        lines.append("The runs' configs are the same (data.path aside).")
    lines.append("")
    for title, png, drawn in figures:
        lines += [f"## {title} ({drawn} runs)", "", f"![{title}]({png})", ""]
    page = out / "index.md"
    atomic_write_text(page, "\n".join(lines))
    return page
