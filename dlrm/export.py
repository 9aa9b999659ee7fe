"""A checkpoint → a model directory that scores raw rows on its own (``dlrm export``).

``MODEL/`` holds:

- ``model.json``: the format, the table precision, the checkpoint and step it came from,
  the model section of the run's config, the table sizes, and the training dataset's
  encoding: its manifest's feature schema (with the dense statistics), encoding and, for
  a declared layout, the schema itself;
- ``tables/``: the training dataset's vocabularies as the hash tables preprocessing
  looks ids up in (vocab-encoded features);
- ``items.parquet``: where the schema names item features, every distinct item of the
  training data (``dlrm.recommend``'s default candidates);
- ``weights.pt``: the unsharded model's tensors, read back with ``weights_only`` (nothing
  is unpickled but tensors, TorchRec's packed int4 tensor among them). Below fp32 the
  tables are TorchRec's quantized ``EmbeddingBagCollection``
  (``torchrec.inference.modules.quantize_embeddings``: fp16, or int8 / int4 with a scale
  and bias per row); the MLPs stay fp32.

A checkpoint written by any number of ranks is read whole, without a process group, by
``torch.distributed.checkpoint`` (its metadata first checked by the checkpoint module's
safe unpickler). Loading builds the same modules from ``model.json`` and fills them.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from torchrec.inference.modules import quantize_embeddings
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.tensor_types import UInt4Tensor

from dlrm.checkpoint import verify
from dlrm.config import ModelConfig
from dlrm.data.integrity import WRITE, read_table
from dlrm.data.like import VOCAB, schema_of
from dlrm.data.preprocess import load_manifest
from dlrm.data.schema import Features
from dlrm.data.splits import resolve_split, split_specs
from dlrm.data.vocab import save_tables
from dlrm.fsutil import atomic_write_json
from dlrm.model import DLRMTrain, build_model

FORMAT = "dlrm-model/1"
MODEL_JSON, WEIGHTS, TABLES = "model.json", "weights.pt", "tables"
PRECISIONS = {"fp32": None, "fp16": torch.float16, "int8": torch.qint8,
              "int4": torch.quint4x2}
_DATA_TYPES = {"fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4}


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or a model directory that cannot be loaded;
    the message names the file."""


@dataclass
class Exported:
    """A loaded model directory: the model (eval mode, CPU) and what encodes its input."""

    path: Path
    info: dict[str, Any]
    model: DLRMTrain

    @property
    def features(self) -> Features:
        return Features.of(self.info["dataset"])

    @property
    def manifest(self) -> dict[str, Any]:
        """The training dataset's manifest as far as encoding needs it."""
        return self.info["dataset"]


def _float_model(info: dict[str, Any]) -> DLRMTrain:
    cpu = torch.device("cpu")
    return build_model(ModelConfig(**info["model"]), Features.of(info["dataset"]),
                       info["table_sizes"], cpu, sparse_device=cpu)


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
    from dlrm.offline import run_config

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
    dataset = json.loads(json.dumps(  # a copy: the model's own files are named in it
        {k: manifest[k] for k in ("format", "schema", "encoding", "cardinalities")}))
    info = {"format": FORMAT, "tables": tables, "checkpoint": str(checkpoint.resolve()),
            "step": marker["position"]["step"], "model": dataclasses.asdict(config.model),
            "table_sizes": marker["position"]["table_sizes"], "trained_on": str(data.resolve()),
            "dataset": dataset}
    if manifest["schema"].get("label_kind") == "regression":
        train = split_specs(config.data, manifest)["train"]
        info["prediction_range"] = label_range(data, manifest, train) if clip else None
    model = _float_model(info)
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
    schema, _ = schema_of(manifest)
    for i, join in enumerate(schema.joins):  # side tables travel with the model
        (tmp / JOINS).mkdir(exist_ok=True)
        name = f"{JOINS}/{i}-{Path(join.file).name}"
        shutil.copyfile(join.file, tmp / name)
        info["dataset"]["schema"]["declared"]["joins"][i]["file"] = name
    if schema.item:  # the candidates `dlrm recommend` scores by default
        from dlrm.recommend import ITEMS, items_of_dataset

        train = split_specs(config.data, manifest)["train"]  # the items the model trained on
        pq.write_table(items_of_dataset(data, manifest, schema, vocabs, train), tmp / ITEMS,
                       **WRITE)
    atomic_write_json(tmp / MODEL_JSON, info)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return info


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


JOINS = "joins"  # MODEL/joins/: the side tables of the schema, which it names relatively


def label_range(data: Path, manifest: dict[str, Any], specs: list[str]) -> list[float]:
    """The smallest and largest label of the rows ``specs`` name."""
    label, lo, hi = manifest["schema"]["label"], np.inf, -np.inf
    for segment in resolve_split(data, manifest, specs):
        column = read_table(segment.path, segment.bytes, columns=[label]).column(label)
        values = column.slice(segment.start, segment.stop - segment.start).to_numpy()
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return [lo, hi]


def load_exported(path: str | Path) -> Exported:
    """The model directory ``path``, in one process, no process group."""
    path = Path(path)
    try:
        info = json.loads((path / MODEL_JSON).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path / MODEL_JSON} not found: not a model directory "
                          "(write one with dlrm export)") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path / MODEL_JSON}: corrupt ({e})") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{path / MODEL_JSON}: unknown format {info.get('format')!r}")
    model = _float_model(info) if info["tables"] == "fp32" else _quantized_shell(info)
    try:
        # Tensors only; TorchRec's packed int4 tensor type is the one class admitted.
        with torch.serialization.safe_globals([UInt4Tensor]):
            weights = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ExportError(f"{path / WEIGHTS}: unreadable, or holds more than tensors "
                          f"({str(e).splitlines()[0]})") from None
    model.load_state_dict(weights)
    model.eval()
    return Exported(path, info, model)


def _quantized_shell(info: dict[str, Any]) -> DLRMTrain:
    """The quantized model's modules, without quantizing anything: a float model whose
    tables are on the meta device, its collection replaced by an empty quantized one."""
    model = build_model(ModelConfig(**info["model"]), Features.of(info["dataset"]),
                        info["table_sizes"], torch.device("cpu"))
    arch = model.model.sparse_arch
    configs = [dataclasses.replace(t, data_type=_DATA_TYPES[info["tables"]])
               for t in arch.embedding_bag_collection.embedding_bag_configs()]
    arch.embedding_bag_collection = QuantEBC(configs, is_weighted=False,
                                             device=torch.device("cpu"),
                                             output_dtype=torch.float)
    return model
