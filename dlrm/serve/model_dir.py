"""The model directory ``dlrm export`` writes and everything that scores loads.

``MODEL/`` holds:

- ``model.json``: the format, the table precision, the checkpoint and step it came from,
  the model section of the run's config, the table sizes, and the training dataset's
  encoding: its manifest's feature schema (with the dense statistics), encoding and, for
  a declared layout, the schema itself;
- ``tables/``: the training dataset's vocabularies as the hash tables preprocessing
  looks ids up in (vocab-encoded features);
- ``items.parquet``: where the schema names item features, every distinct item of the
  training data (``dlrm.serve.recommend``'s default candidates);
- ``weights.pt``: the unsharded model's tensors, read back with ``weights_only`` (nothing
  is unpickled but tensors, TorchRec's packed int4 tensor among them). Below fp32 the
  tables are TorchRec's quantized ``EmbeddingBagCollection``
  (``torchrec.inference.modules.quantize_embeddings``: fp16, or int8 / int4 with a scale
  and bias per row); the MLPs stay fp32.

Loading (:func:`load_exported`) needs one process and no process group: it builds the
same modules from ``model.json`` and fills them.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.tensor_types import UInt4Tensor

from dlrm.config import ModelConfig
from dlrm.errors import ExportError
from dlrm.schema.declared import Schema
from dlrm.schema.features import Features
from dlrm.schema.integrity import read_table
from dlrm.schema.manifest import DatasetEncoding, Manifest
from dlrm.schema.splits import ALL, resolve_split
from dlrm.train.model import DLRMTrain, build_model

FORMAT = "dlrm-model/1"
MODEL_JSON, WEIGHTS, TABLES = "model.json", "weights.pt", "tables"
PRECISIONS = {"fp32": None, "fp16": torch.float16, "int8": torch.qint8,
              "int4": torch.quint4x2}
_DATA_TYPES = {"fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4}


@dataclass
class Exported:
    """A loaded model directory: the model (eval mode, CPU) and what encodes its input:
    the training dataset's manifest as far as encoding needs it (``model.json``'s
    ``dataset``)."""

    path: Path
    info: dict[str, Any]
    model: DLRMTrain
    manifest: DatasetEncoding

    @property
    def features(self) -> Features:
        return self.manifest.features


def float_model(info: dict[str, Any]) -> DLRMTrain:
    cpu = torch.device("cpu")
    return build_model(ModelConfig(**info["model"]), _features(info),
                       info["table_sizes"], cpu, sparse_device=cpu)


def _features(info: dict[str, Any]) -> Features:
    return Features.from_schema(info["dataset"]["schema"])


JOINS = "joins"  # MODEL/joins/: the side tables of the schema, which it names relatively
ITEMS = "items.parquet"  # with [roles]: the candidates `dlrm recommend` scores by default
KEY = "item"  # its column of the keys people read


def items_of_dataset(data: Path, manifest: Manifest, schema: Schema,
                     vocabs: dict[str, np.ndarray], specs: list[str] = (ALL,)) -> pa.Table:
    """Every distinct item (by its key's id) of the rows ``specs`` name in a dataset (the
    training split), its features as first seen there."""
    key, parts, seen = schema.item[0], [], np.zeros(0, np.int64)
    for segment in resolve_split(data, manifest, list(specs)):
        table = read_table(segment.path, segment.bytes, columns=list(schema.item))
        table = table.slice(segment.start, segment.stop - segment.start)
        ids = table.column(key).to_numpy()
        first = np.unique(ids, return_index=True)[1]
        fresh = first[~np.isin(ids[first], seen) & (ids[first] > 1)]  # not missing or OOV
        parts.append(table.take(np.sort(fresh)))
        seen = np.union1d(seen, ids[fresh])
    items = pa.concat_tables(parts) if parts else read_table(segment.path).slice(0, 0)
    return items.append_column(KEY, pa.array(key_names(items.column(key).to_numpy(),
                                                       vocabs.get(key))))


def key_names(ids: np.ndarray, vocab: np.ndarray | None) -> list[str]:
    """Items' keys for people: the value an id stands for (an integer key itself, a text
    key ``#`` and its hash); a hashed feature: ``id:N``."""
    if vocab is None:
        return [f"id:{i}" for i in ids]
    values = [int(v) for v in vocab[ids - 2]]
    return [str(v) if v < 2**63 else f"#{v:016x}" for v in values]


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
    dataset = DatasetEncoding.from_json(info.get("dataset"), path / MODEL_JSON, ExportError,
                                        "dataset.")
    model = float_model(info) if info["tables"] == "fp32" else _quantized_shell(info)
    try:
        # Tensors only; TorchRec's packed int4 tensor type is the one class admitted.
        with torch.serialization.safe_globals([UInt4Tensor]):
            weights = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ExportError(f"{path / WEIGHTS}: unreadable, or holds more than tensors "
                          f"({str(e).splitlines()[0]})") from None
    model.load_state_dict(weights)
    if info["tables"] == "fp32":
        _fuse_tables(model)
    model.eval()
    return Exported(path, info, model, dataset)


def _fuse_tables(model: DLRMTrain) -> None:
    """fp32 tables looked up by FBGEMM's fused kernel (TorchRec's inference collection with
    fp32 rows) instead of one ``nn.EmbeddingBag`` per table: the same rows, so the same
    sums (measured: equal outputs), in a quarter of the time for a few rows. Tables stored
    as fp16 (``model.embedding_dtype``) stay as they are."""
    arch = model.model.sparse_arch
    float_ebc = arch.embedding_bag_collection
    weights = float_ebc.state_dict()
    if any(w.dtype != torch.float32 for w in weights.values()):
        return
    configs = [dataclasses.replace(t, data_type=DataType.FP32)
               for t in float_ebc.embedding_bag_configs()]
    fused = QuantEBC(configs, is_weighted=False, device=torch.device("cpu"),
                     output_dtype=torch.float)
    # Its rows are bytes: each fp32 row's 4 * dim bytes, as the float table holds them.
    fused.load_state_dict({k: w.contiguous().view(torch.uint8) for k, w in weights.items()})
    arch.embedding_bag_collection = fused


def _quantized_shell(info: dict[str, Any]) -> DLRMTrain:
    """The quantized model's modules, without quantizing anything: a float model whose
    tables are on the meta device, its collection replaced by an empty quantized one."""
    model = build_model(ModelConfig(**info["model"]), _features(info),
                        info["table_sizes"], torch.device("cpu"))
    arch = model.model.sparse_arch
    configs = [dataclasses.replace(t, data_type=_DATA_TYPES[info["tables"]])
               for t in arch.embedding_bag_collection.embedding_bag_configs()]
    arch.embedding_bag_collection = QuantEBC(configs, is_weighted=False,
                                             device=torch.device("cpu"),
                                             output_dtype=torch.float)
    return model
