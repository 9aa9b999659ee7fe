"""``dlrm sweep``: an Optuna search over config keys, each trial a ``dlrm train`` run.

The space is one TOML file, a table per config key::

    ["optim.embedding_lr"]
    low = 0.01
    high = 0.5
    log = true                    # a range: float, or int where low and high are ints

    ["optim.dense_optimizer"]
    choices = ["adagrad", "adam"] # a choice

Each trial trains under ``torchrun --nproc-per-node N`` in ``DIR/trial-NNNN`` (its log in
``DIR/logs/``) with the recipe, the command's overrides and the trial's values, and is
scored by its last validation AUC (maximised) or, for a regression label, RMSE
(minimised). Optuna's TPE sampler picks the values, seeded by ``--seed`` plus the
trials the study already holds.

The study is Optuna's journal file ``DIR/study.log``: a rerun of the same command
resumes it. Finished trials (complete, or failed: a run that exited with an error) are
never started again; a trial cut off mid-run (the sweep was killed) is retried with its
own values; then trials run until the study holds ``--trials`` finished ones. The sweep
ends with ``dlrm report`` over its completed trials (``DIR/report/index.md``) and the best
trial's values in ``DIR/best.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from dlrm.config import load_config
from dlrm.errors import ConfigError, PreprocessError
from dlrm.experiments.compare import compare, final_metrics
from dlrm.experiments.report import read_metrics
from dlrm.schema.manifest import load_manifest
from dlrm.utils.files import atomic_write_json, read_toml

STUDY = "dlrm-sweep"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL)


class TrialFailed(RuntimeError):
    """A trial's training run exited with an error (recorded as a failed trial)."""


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Reads and checks a space file: each key a range (``low``, ``high``, ``log``) or a
    choice (``choices``). Raises ConfigError naming the file and key."""
    doc = read_toml(Path(path), ConfigError, "space")
    if not doc:
        raise ConfigError(f"{path}: no keys to search")
    for key, spec in doc.items():
        where = f"{path}: {key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a table (low/high or choices)")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) \
                    or not spec["choices"]:
                raise ConfigError(f"{where}: a choice is `choices = [...]` alone")
            continue
        if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise ConfigError(f"{where}: a range is `low`, `high` and optionally `log`")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) \
                or not low < high:
            raise ConfigError(f"{where}: need numbers low < high, got {low!r}, {high!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0")
    return doc


def _suggest(trial: optuna.Trial, key: str, spec: dict[str, Any]) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    log = bool(spec.get("log", False))
    if isinstance(spec["low"], int) and isinstance(spec["high"], int):
        return trial.suggest_int(key, spec["low"], spec["high"], log=log)
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=log)


def override(key: str, value: Any) -> str:
    """``--key=value`` as the command line reads it (TOML values; strings bare)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def _first(spec: dict[str, Any]) -> Any:
    return spec["choices"][0] if "choices" in spec else spec["low"]


def _score(run: Path, metric: str) -> float:
    """The run's last validation ``metric``."""
    try:
        last = final_metrics(read_metrics(run)).get(f"eval/val/{metric}")
    except ValueError as e:  # no (readable) metrics.jsonl
        raise TrialFailed(str(e)) from None
    if last is None:
        raise TrialFailed(f"{run}: no validation {metric} in metrics.jsonl")
    return float(last)


def sweep(config: str, space_path: str, trials: int, runs_dir: str | Path,
          overrides: list[str] = (), nproc_per_node: int = 1, seed: int = 0,
          log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns the best trial's number, value and params.

    Raises:
        ConfigError: a bad space, a key the config does not have, or a directory that
            holds another sweep.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own event lines only
    space = load_space(space_path)
    # The recipe with the overrides and each key's first value: every key the space
    # names must be one the config has, with a value of its type.
    base = load_config(config, [*overrides, *(override(k, _first(s)) for k, s in space.items())])
    try:
        kind = load_manifest(base.data.path).features.label_kind
    except PreprocessError as e:
        raise ConfigError(f"data.path: {e}") from None
    metric, direction = ("rmse", "minimize") if kind == "regression" else ("auc", "maximize")
    root = Path(runs_dir)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    what = {"config": str(Path(config).resolve()), "overrides": list(overrides),
            "space": space, "nproc_per_node": nproc_per_node, "seed": seed}
    storage = JournalStorage(JournalFileBackend(str(root / "study.log")))
    study = optuna.create_study(study_name=STUDY, storage=storage, direction=direction,
                                load_if_exists=True)
    # Seeded, and on from where the study stands: a resumed sweep must not draw the
    # values its first run drew again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials()))
    held = study.user_attrs.get("sweep")
    if held is None:
        study.set_user_attr("sweep", what)
    elif held != json.loads(json.dumps(what)):
        raise ConfigError(f"{root}: holds a sweep of another config, space or overrides "
                          f"({held}); choose another --runs-dir")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log(json.dumps({"event": "sweep_retry", "trial": t.number, "params": t.params}))
        study.tell(t.number, state=TrialState.FAIL)
        study.set_user_attr(f"cut_off_{t.number}", True)
        study.enqueue_trial(t.params)
    done = [t for t in study.get_trials(deepcopy=False, states=FINISHED)
            if not study.user_attrs.get(f"cut_off_{t.number}")]
    todo = max(trials - len(done), 0)
    log(json.dumps({"event": "sweep", "finished": len(done), "to_run": todo,
                    "runs_dir": str(root)}))

    def objective(trial: optuna.Trial) -> float:
        values = {k: _suggest(trial, k, s) for k, s in space.items()}
        run = root / f"trial-{trial.number:04d}"
        shutil.rmtree(run, ignore_errors=True)  # a cut-off earlier try of this number
        trial.set_user_attr("run_dir", str(run))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc_per_node}", "-m", "dlrm", "train", "--config",
               config, "--run-dir", str(run), *overrides,
               *(override(k, v) for k, v in values.items())]
        with open(root / "logs" / f"trial-{trial.number:04d}.log", "w") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise TrialFailed(f"trial {trial.number}: dlrm train exited {code} "
                              f"(log: {root / 'logs'})")
        value = _score(run, metric)
        log(json.dumps({"event": "trial", "trial": trial.number, metric: value,
                        "params": values}))
        return value

    if todo:
        study.optimize(objective, n_trials=todo, catch=(TrialFailed,))
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=direction == "maximize")
    if not complete:
        raise ConfigError(f"{root}: no trial completed (logs in {root / 'logs'})")
    best = {"trial": complete[0].number, metric: complete[0].value,
            "params": complete[0].params, "run_dir": complete[0].user_attrs["run_dir"]}
    atomic_write_json(root / "best.json", best)
    page = compare([t.user_attrs["run_dir"] for t in complete], root / "report")
    log(json.dumps({"event": "sweep_done", "best": best, "report": str(page)}))
    return best
