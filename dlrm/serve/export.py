"""A checkpoint → a model directory that scores raw rows on its own (``dlrm export``).

The directory's layout and its loading are ``dlrm.serve.model_dir``'s. A checkpoint written by
any number of ranks is read whole, without a process group, by
``torch.distributed.checkpoint`` (its metadata first checked by the checkpoint module's
safe unpickler); below fp32 the tables go through TorchRec's inference quantization.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from torchrec.inference.modules import quantize_embeddings

from dlrm.data.split_checks import split_specs
from dlrm.errors import ExportError
from dlrm.rows.like import VOCAB, file_sha256, schema_of
from dlrm.rows.managed import lookup_path
from dlrm.rows.vocab import save_tables
from dlrm.schema.integrity import WRITE, read_table
from dlrm.schema.manifest import Manifest, load_manifest
from dlrm.schema.splits import resolve_split
from dlrm.serve.managed_export import load_managed
from dlrm.serve.model_dir import (
    FORMAT,
    ITEMS,
    JOINS,
    MODEL_JSON,
    PRECISIONS,
    TABLES,
    WEIGHTS,
    float_model,
    items_of_dataset,
)
from dlrm.train.checkpoint import verify
from dlrm.train.model import DLRMTrain
from dlrm.train.preflight import run_config
from dlrm.utils.files import atomic_write_json


def _quantize(model: DLRMTrain, precision: str) -> None:
    """The tables through TorchRec's inference quantization (in place)."""
    if PRECISIONS[precision] is not None:
        quantize_embeddings(model.model, dtype=PRECISIONS[precision], inplace=True,
                            output_dtype=torch.float)


def export(checkpoint: str | Path, out: str | Path, tables: str = "fp32",
           clip: bool = True) -> dict[str, Any]:
    """Writes the model directory ``out`` from ``checkpoint`` (``RUN/checkpoints/step-N``,
    its run's ``config.toml`` and training dataset beside it); returns ``model.json``.
    ``clip``: a regression's predictions are kept within the labels of its training rows
    (``model.json``'s ``prediction_range``)."""
    if tables not in PRECISIONS:
        raise ExportError(f"--tables must be one of {', '.join(PRECISIONS)}, got {tables!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        done = _same_export(out, checkpoint, tables, clip)
        if done is not None:  # a rerun (after a kill, say): the directory is complete
            return done
        raise ExportError(f"{out} is not empty; choose another --out")
    marker = verify(checkpoint)  # every file against its checksum; the metadata safely
    config = run_config(checkpoint)
    if config.data.multi_hot_sizes:
        raise ExportError(f"{checkpoint}: its run expanded the ids synthetically "
                          "(data.multi_hot_sizes), which raw rows do not have: not exported")
    data = Path(config.data.path)
    manifest = load_manifest(data)
    dataset = manifest.encoding_json()  # a copy: the model's own files are named in it
    info = {"format": FORMAT, "tables": tables, "checkpoint": str(checkpoint.resolve()),
            "step": marker["position"]["step"], "model": dataclasses.asdict(config.model),
            "table_sizes": marker["position"]["table_sizes"], "trained_on": str(data.resolve()),
            "dataset": dataset, "vocabulary": vocabulary_record(data, manifest)}
    if manifest.features.label_kind == "regression":
        train = split_specs(config.data, manifest)["train"]
        info["prediction_range"] = label_range(data, manifest, train) if clip else None
    model = float_model(info)
    lookups = {}
    if manifest.managed:  # plain tables, and the collision modules' rows as lookups
        lookups = load_managed(checkpoint, model, manifest.features, info["table_sizes"])
    else:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        model.load_state_dict(state["model"])
    _quantize(model, tables)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
    vocabs: dict[str, np.ndarray] = {}
    if (data / VOCAB).is_file():
        with np.load(data / VOCAB) as z:
            vocabs = {name: z[name] for name in z.files}
        save_tables(vocabs, tmp / TABLES)
    for feature, lookup in lookups.items():
        (tmp / TABLES).mkdir(exist_ok=True)
        lookup.save(lookup_path(tmp / TABLES, feature))
    schema = schema_of(manifest)
    for i, join in enumerate(schema.joins):  # side tables travel with the model
        (tmp / JOINS).mkdir(exist_ok=True)
        name = f"{JOINS}/{i}-{Path(join.file).name}"
        shutil.copyfile(join.file, tmp / name)
        info["dataset"]["schema"]["declared"]["joins"][i]["file"] = name
    if schema.item:  # the candidates `dlrm recommend` scores by default
        train = split_specs(config.data, manifest)["train"]  # the items the model trained on
        pq.write_table(items_of_dataset(data, manifest, schema, vocabs, train), tmp / ITEMS,
                       **WRITE)
    atomic_write_json(tmp / MODEL_JSON, info)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return info


def vocabulary_record(data: Path, manifest: Manifest) -> dict[str, Any]:
    """Which vocabularies the model's ids are: the training dataset's generation (how often
    they were grown, ``dlrm preprocess --grow``), their checksum (None: hashed features
    only) and the checksums of those they grew from."""
    vocab = data / VOCAB
    return {"generation": manifest.generation, "lineage": manifest.lineage,
            "sha256": file_sha256(vocab) if vocab.is_file() else None}


def _same_export(out: Path, checkpoint: Path, tables: str, clip: bool) -> dict[str, Any] | None:
    """``model.json`` of ``out`` if it is this export (the checkpoint, precision and
    clipping asked for), else None. A model directory appears whole (renamed into place
    once written), so its ``model.json`` stands for every file."""
    try:
        info = json.loads((out / MODEL_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    clipped = info.get("prediction_range") is not None
    regression = info.get("dataset", {}).get("schema", {}).get("label_kind") == "regression"
    same = (info.get("format") == FORMAT and info.get("checkpoint") == str(checkpoint.resolve())
            and info.get("tables") == tables and (not regression or clipped == clip))
    return info if same else None


def label_range(data: Path, manifest: Manifest, specs: list[str]) -> list[float]:
    """The smallest and largest label of the rows ``specs`` name."""
    label, lo, hi = manifest.features.label, np.inf, -np.inf
    for segment in resolve_split(data, manifest, specs):
        column = read_table(segment.path, segment.bytes, columns=[label]).column(label)
        values = column.slice(segment.start, segment.stop - segment.start).to_numpy()
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return [lo, hi]


