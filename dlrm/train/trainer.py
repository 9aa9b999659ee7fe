"""The training recipe: data → model on meta → shard → optimizers → pipeline → loop → evaluate."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from dlrm.config import Config, to_toml
from dlrm.data.loader import ParquetBatches
from dlrm.data.split_checks import split_specs
from dlrm.errors import CheckpointError, ConfigError
from dlrm.metrics import HEADLINE
from dlrm.schema.splits import resolve_split
from dlrm.train.checkpoint import Checkpointer, read_marker
from dlrm.train.dist import broadcast_object, gather_object, init_distributed
from dlrm.train.evaluate import evaluate
from dlrm.train.model import table_sizes
from dlrm.train.optim import (
    LRSchedule,
    build_optimizer,
    init_dense_state,
)
from dlrm.train.preemption import PreemptionFlag
from dlrm.train.preflight import check_managed_world, preflight
from dlrm.train.sharding import sharded_model
from dlrm.train.stopping import BEST, Best, best_metric
from dlrm.utils.files import atomic_write_json, atomic_write_text
from dlrm.utils.host import peak_rss_bytes
from dlrm.utils.runlog import RunLog
from dlrm.utils.writer_lock import writer_lock

SPLITS = ("train", "val", "test")
logger = logging.getLogger(__name__)


class Trainer:
    """Builds the parts in the order one thinks of them; ``train()`` runs the loop."""

    def __init__(self, config: Config, run_dir: str | Path | None = None) -> None:
        self.config = config
        self.manifest = manifest = preflight(config)
        self.dist = init_distributed(config.train.device, config.train.collective_timeout_s)
        rank, world, device = self.dist.rank, self.dist.world_size, self.dist.device

        default_dir = f"runs/train-{datetime.now():%Y%m%d-%H%M%S}"
        self.run_dir = Path(broadcast_object(str(run_dir or default_dir)))
        self.lock = self._lock_run_dir()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints",
                                         keep=config.train.keep_checkpoints)
        if self.dist.is_main:  # what a save that never finished left keeps the disk full
            self.checkpointer.remove_partials()
        resume_from = self._checkpoint_to_resume()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.toml", to_toml(config))
        self.log = RunLog(self.run_dir, enabled=self.dist.is_main, append=resume_from is not None)

        # Data: each rank its own contiguous part of each split.
        data, eval_bs = config.data, config.eval.batch_size or config.data.batch_size
        specs = split_specs(data, manifest)
        segments = {s: resolve_split(data.path, manifest, specs[s]) for s in SPLITS}
        self.features = manifest.features
        every = dict(features=self.features, prefetch=data.prefetch,
                     multi_hot_sizes=data.multi_hot_sizes,
                     cardinalities=manifest.id_limits, multi_hot_seed=data.multi_hot_seed,
                     # pinned in the loader's thread, so the pipeline's copy is asynchronous
                     finish=Batch.pin_memory if device.type == "cuda" else None)
        self.train_batches = ParquetBatches(
            segments["train"], data.batch_size, rank, world, shuffle_buffer=data.shuffle_buffer,
            seed=data.shuffle_seed, oov_dropout={self.features.sparse.index(f): p
                                                 for f, p in data.oov_dropout.items() if p},
            **every)
        self.eval_batches = {  # a split asked to be "none" has none
            s: ParquetBatches(segments[s], eval_bs, rank, world, pad=True, **every)
            for s in ("val", "test") if specs[s]
        }
        self.log.event("splits", **{s: {"rows": sum(g.stop - g.start for g in segments[s]),
                                        "sources": specs[s]} for s in SPLITS})
        if len(self.train_batches) == 0:
            raise ValueError(
                f"data: {self.train_batches.rows_total} training rows are fewer than "
                f"world_size × data.batch_size = {world} × {data.batch_size}"
            )

        # Model: tables on meta, sharded by the planner; dense parts replicated under DDP.
        torch.manual_seed(config.train.seed)
        self.table_sizes = table_sizes(config.model, self.features, manifest.cardinalities)
        self.model, plan, memory = sharded_model(config, self.features, self.table_sizes, device,
                                                 data.batch_size, evictions=manifest.evictions)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "plan.txt", plan)
            self.log.event("plan", memory_per_rank=memory)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.schedule = LRSchedule(self.optimizer, config.optim)
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, device)

        # Where training stands: a step counts one batch on every rank.
        self.step, self.epoch, self.batch = 0, 0, 0
        self.best = Best(best_metric(config.train, self.features.label_kind))
        self.stopped: str | None = None  # why training stopped before its last epoch
        if resume_from is not None:
            self._restore(resume_from)
        elif config.train.init_from:
            self._init_from(Path(config.train.init_from))
        if config.train.tensorboard:
            self.log.tensorboard(self.step)
            self.log.metric(self.step, **{f"plan/rank{m['rank']}/{k}": m[k] for m in memory
                                          for k in ("hbm_gib", "ddr_gib")})
        self.log.event("start", world_size=world, device=str(device),
                       train_rows=self.train_batches.rows_total,
                       steps_per_epoch=self._steps_per_epoch(), run_dir=str(self.run_dir),
                       resumed_from=str(resume_from) if resume_from else None, step=self.step)

    def _lock_run_dir(self) -> contextlib.ExitStack:
        """One run per run directory: rank 0 holds its lock until ``close``; every rank
        raises ConfigError together, naming the holder, where another run has it."""
        lock, refused = contextlib.ExitStack(), None
        if self.dist.is_main:
            try:
                lock.enter_context(writer_lock(self.run_dir, ConfigError, "dlrm train"))
            except ConfigError as e:
                refused = str(e)
        refused = broadcast_object(refused)
        if refused:
            raise ConfigError(refused)
        return lock

    def close(self) -> None:
        """Lets go of the run directory."""
        self.lock.close()

    def _steps_per_epoch(self) -> int:
        limit = self.config.train.limit_train_batches
        return min(len(self.train_batches), limit) if limit else len(self.train_batches)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_to_resume(self) -> Path | None:
        """train.resume: ``auto`` (newest complete checkpoint, bad ones skipped with a
        warning), ``none``, or a path (a bad one is an error). All ranks decide together."""
        resume = self.config.train.resume
        if resume == "none":
            return None
        if resume != "auto":
            return Path(resume)  # verified when loaded: a bad one is an error
        return self.checkpointer.latest()

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def _save(self, name: str | None = None) -> None:
        """A checkpoint of where training stands (``name``: under that name, e.g. the best,
        instead of ``step-N``)."""
        epoch, batch = self.epoch, self.batch
        if batch >= self._steps_per_epoch():  # an epoch just ended: point at the next
            epoch, batch = epoch + 1, 0
        rng = [None] * self.dist.world_size  # each rank's generators, by rank
        dist.all_gather_object(rng, _rng_state())
        position = {"step": self.step, "epoch": epoch, "batch": batch,
                    "world_size": self.dist.world_size,
                    "batch_size": self.config.data.batch_size, "rng": rng,
                    "table_sizes": self.table_sizes, "label_kind": self.features.label_kind,
                    "best": self.best.to_json(), "stopped": self.stopped}
        start = time.perf_counter()
        path = self.checkpointer.save(self.step, self._state(), position, name)
        self.log.event("checkpoint", step=self.step, path=str(path),
                       seconds=time.perf_counter() - start)

    def _load(self, path: Path, optimizer: bool = True, grow: bool = False) -> dict[str, Any]:
        """The model's state (and the optimizer's) from checkpoint ``path``, into larger
        tables if ``grow``; its position."""
        if optimizer:
            # Optimizers such as Adam make their state at their first step: without it, the
            # state dict has no slots for the checkpoint's moments and they would be dropped.
            init_dense_state(self.optimizer)
        state = self._state() if optimizer else {"model": self.model.state_dict()}
        try:
            check_managed_world(self.manifest, read_marker(path)["position"], str(path),
                                self.dist.world_size)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        position = self.checkpointer.load(path, state, grow)
        self.model.load_state_dict(state["model"])
        if optimizer:
            self.optimizer.load_state_dict(state["optim"])
        return position

    def _init_from(self, path: Path) -> None:
        """Another run's tables, dense part and (unless weights only) optimizer state, its
        tables grown where this run's vocabularies grew theirs (checked by ``preflight``);
        the position stays this run's own: step 0, epoch 0."""
        start = time.perf_counter()
        weights_only = self.config.train.init_from_weights_only
        position = self._load(path, optimizer=not weights_only, grow=True)
        grown = sum(new - old for new, old in zip(self.table_sizes, position["table_sizes"],
                                                  strict=True))
        self.log.event("init_from", path=str(path), its_step=position["step"],
                       weights_only=weights_only, rows_grown=grown,
                       seconds=time.perf_counter() - start)

    def _restore(self, path: Path) -> None:
        start = time.perf_counter()
        position = self._load(path)
        self.log.event("restore", step=position["step"], path=str(path),
                       seconds=time.perf_counter() - start)
        self.step, self.epoch, self.batch = position["step"], position["epoch"], position["batch"]
        if "best" in position:
            self.best = Best.from_json(self.best.metric, position["best"])
        # A run that stopped early and is run again has no epoch left to train.
        self.stopped = position.get("stopped")
        if position["world_size"] == self.dist.world_size:
            _set_rng_state(position["rng"][self.dist.rank])
        else:
            # Same samples seen, as near as batches allow; the exact rows differ, since
            # each rank's part of the data depends on the world size.
            self.batch = self.batch * position["world_size"] // self.dist.world_size
            logger.warning("%s was written by %d ranks, resumed on %d: the rest of epoch %d "
                           "starts at batch %d of each rank", path, position["world_size"],
                           self.dist.world_size, self.epoch, self.batch)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, dict[str, float]] | None:
        """Runs the epochs left, then evaluates val and test; returns the final metrics.

        On SIGTERM (preemption) every rank stops at the same step, a checkpoint is
        written and None is returned.
        """
        cfg = self.config.train
        global_batch = self.config.data.batch_size * self.dist.world_size
        loss_sum = torch.zeros((), device=self.dist.device)
        window_steps, window_start = 0, time.perf_counter()
        samples, train_seconds = 0, 0.0
        reached = self.stopped is not None  # a target, or early stopping
        with PreemptionFlag(cfg.collective_timeout_s) as term:
            while self.epoch < cfg.epochs and not reached:
                steps = self._steps_per_epoch() - self.batch
                self.log.progress(steps, desc=f"epoch {self.epoch}")
                batches = itertools.islice(
                    self.train_batches.iter_epoch(self.epoch, skip=self.batch), max(steps, 0))
                while True:
                    self.schedule.set_step(self.step)  # the rates of the coming update
                    try:
                        loss, _, _ = self.pipeline.progress(batches)
                    except StopIteration:
                        break
                    self.step += 1
                    self.batch += 1
                    window_steps += 1
                    loss_sum += loss
                    self.log.advance(1)
                    if self.step % cfg.log_every == 0:
                        train_seconds += self._log_train(loss_sum, window_steps, window_start,
                                                         global_batch)
                        samples += window_steps * global_batch
                        loss_sum.zero_()
                        window_steps, window_start = 0, time.perf_counter()
                    end_of_epoch = self.batch == self._steps_per_epoch()
                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or \
                            (self._validates_each_epoch() and end_of_epoch):
                        paused = time.perf_counter()
                        reached = self._validated(self._evaluate(("val",))["val"])
                        window_start += time.perf_counter() - paused  # not training time
                    if term.agreed():
                        self.pipeline.detach()
                        self._save()
                        self.log.event("preempted", step=self.step)
                        self.log.close()
                        return None
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._save()
                    if reached:
                        break
                self.log.close_progress()
                if self.batch >= self._steps_per_epoch():
                    self.epoch, self.batch = self.epoch + 1, 0
        if window_steps:
            train_seconds += self._log_train(loss_sum, window_steps, window_start, global_batch)
            samples += window_steps * global_batch
        self.pipeline.detach()
        if not (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self._save()
        final_step = self.step
        if cfg.keep_best and self.best.step is not None:
            self._load_best()
        results = self._evaluate(tuple(self.eval_batches), final=True,
                                 step=self.best.step if cfg.keep_best else None)
        summary = {"steps": final_step, "samples": samples,
                   "samples_per_sec": samples / train_seconds if train_seconds else 0.0,
                   **({"best": self.best.to_json()} if self.best.step is not None else {})}
        for split, m in results.items():
            summary.update({f"{split}_{k}": m[k] for k in HEADLINE[self.features.label_kind]})
        peaks = gather_object(round(peak_rss_bytes() / 2**30, 3))
        self.log.event("done", target_reached=self.stopped == "target_reached",
                       early_stopped=self.stopped == "early_stopping", **summary,
                       peak_rss_gib=peaks)
        self.log.close()
        return results

    def _log_train(self, loss_sum: torch.Tensor, steps: int, start: float,
                   global_batch: int) -> float:
        """Logs the mean loss of all ranks over the window and its global throughput."""
        loss = loss_sum.detach().clone()
        dist.all_reduce(loss)
        seconds = time.perf_counter() - start
        figures = {"train/loss": loss.item() / (steps * self.dist.world_size),
                   "train/samples_per_sec": steps * global_batch / seconds,
                   # of the last update: the dense optimizer's, and the tables'
                   "train/lr": self.optimizer.param_groups[-1]["lr"],
                   "train/embedding_lr": self.optimizer.param_groups[0]["lr"]}
        self.log.metric(self.step, **figures)
        self.log.event("train", step=self.step, **figures)
        return seconds

    def _validates_each_epoch(self) -> bool:
        t = self.config.train
        return bool(t.target_auc or t.target_rmse or t.early_stopping or t.keep_best)

    def _validated(self, val: dict[str, float]) -> bool:
        """Follows a validation: the best so far (kept as ``checkpoints/best`` with
        ``keep_best``), targets and early stopping; True where training should stop."""
        t = self.config.train
        if self.best.update(val[self.best.metric], self.step):
            self.log.event("best", step=self.step, **{self.best.metric: self.best.value})
            if t.keep_best:
                self.pipeline.detach()
                self._save(BEST)
        for metric, target, met in [("auc", t.target_auc, lambda v, x: v >= x),
                                    ("rmse", t.target_rmse, lambda v, x: v <= x)]:
            if target and met(val[metric], target):
                self.log.event("target_reached", step=self.step, **{metric: val[metric]},
                               target=target)
                self.stopped = "target_reached"
                return True
        if t.early_stopping and self.best.stale >= t.early_stopping:
            self.log.event("early_stop", step=self.step, best_step=self.best.step,
                           **{self.best.metric: self.best.value},
                           validations_without_improvement=self.best.stale)
            self.stopped = "early_stopping"
            return True
        return False

    def _load_best(self) -> None:
        """The model of the best validation, for the final evaluation."""
        path = self.checkpointer.directory / BEST
        self._load(path, optimizer=False)
        self.log.event("restore_best", step=self.best.step, path=str(path))

    def _evaluate(self, splits: tuple[str, ...], final: bool = False,
                  step: int | None = None) -> dict[str, dict[str, Any]]:
        """Metrics of ``splits``, logged at ``step`` (the step of the model evaluated,
        default the current one); ``final`` also writes ``RUN/eval/SPLIT.json`` with the
        ROC and calibration curves (what ``dlrm report`` plots)."""
        step = self.step if step is None else step
        # The pipeline rewrote the sharded modules' forward for overlap; detach restores
        # the plain forward (progress() re-attaches, keeping its in-flight batches).
        model = self.pipeline.detach()
        results = {}
        for split in splits:
            e = self.config.eval
            limit = {"val": e.limit_val_batches, "test": e.limit_test_batches}[split]
            m = evaluate(model, self.eval_batches[split], self.dist.device,
                         limit or e.limit_batches, curves=final, kind=self.features.label_kind)
            curves = m.pop("curves", None)
            results[split] = m
            self.log.metric(step, **{f"eval/{split}/{k}": v for k, v in m.items()})
            self.log.event("eval", step=step, split=split, **m)
            if final and self.dist.is_main:
                atomic_write_json(self.run_dir / "eval" / f"{split}.json",
                                  {"step": step, "split": split, "metrics": m,
                                   "curves": curves})
        return results


def _rng_state() -> dict[str, str]:
    """This rank's torch generators (CPU, and CUDA where used), as hex for JSON."""
    state = {"cpu": torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes().hex()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    def tensor(h: str) -> torch.Tensor:
        return torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def train(config: Config, run_dir: str | Path | None = None
          ) -> dict[str, dict[str, float]] | None:
    """One rank of a training run (see :class:`Trainer`); None if preempted."""
    trainer = Trainer(config, run_dir)
    try:
        return trainer.train()
    finally:
        trainer.close()
        dist.destroy_process_group()
