"""A checkpoint of managed tables (``encoding = "managed"``) as an exported model: plain
tables, and each feature's raw id → row lookup (``dlrm.rows.managed.ManagedLookup``).

The training model's tables sit behind TorchRec's managed-collision modules, sharded
row-wise: rank r holds a block of each table's rows and maps the raw ids of its range of
values (block r of ``[0, MANAGED_LIMIT)``, as fbgemm's block bucketization cuts it) to
them, an id it has no row for to its block's last row, reserved. The exported model has
plain tables, the same rows; the modules' sorted raw ids and their rows become the lookup,
and each rank's reserved row the row of the ids it had no row for, so that a raw row
scores as the sharded model scored it in evaluation. An unsharded managed module would
send every such id to the table's one last row instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from dlrm.rows.managed import ManagedLookup
from dlrm.schema.features import MANAGED_LIMIT, Features
from dlrm.train.checkpoint import read_metadata
from dlrm.train.model import DLRMTrain, table_name

_EBC = "model.sparse_arch.embedding_bag_collection."
_TABLES = _EBC + "_embedding_module."  # the plain collection's keys behind the modules
_MODULES = _EBC + "_managed_collision_collection._managed_collision_modules."


def load_managed(checkpoint: Path, model: DLRMTrain, features: Features,
                 sizes: list[int]) -> dict[str, ManagedLookup]:
    """Fills ``model`` (plain tables of ``sizes`` rows) from ``checkpoint``, a managed
    run's; returns each feature's lookup."""
    plain = model.state_dict()
    request = {(_TABLES + k[len(_EBC):] if k.startswith(_EBC) else k): v
               for k, v in plain.items()}
    names = {}
    for f, n in zip(features.sparse, sizes, strict=True):
        for buffer in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"):
            key = f"{_MODULES}{table_name(f)}.{buffer}"
            request[key], names[f, buffer] = torch.zeros(n, dtype=torch.int64), key
    state = {"model": request}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    loaded = state["model"]
    model.load_state_dict({k: loaded[_TABLES + k[len(_EBC):] if k.startswith(_EBC) else k]
                           for k in plain})
    metadata = read_metadata(checkpoint).state_dict_metadata
    lookups = {}
    for f in features.sparse:
        chunks = metadata[f"model.{_TABLES}embedding_bags.{table_name(f)}.weight"].chunks
        blocks = sorted((c.offsets[0], c.sizes[0]) for c in chunks)  # rank r's: the r-th
        raw = loaded[names[f, "_mch_sorted_raw_ids"]].numpy()
        rows = loaded[names[f, "_mch_remapped_ids_mapping"]].numpy()
        held = raw != MANAGED_LIMIT  # the int64 maximum marks a row no id holds
        order = np.argsort(raw[held], kind="stable")
        lookups[f] = ManagedLookup(
            keys=raw[held][order], rows=rows[held][order],
            miss_rows=np.array([start + n - 1 for start, n in blocks], np.int64),
            block=-(-MANAGED_LIMIT // len(blocks)))
    return lookups
