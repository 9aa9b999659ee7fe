"""A dataset's manifest and how it is read back (what preprocessing records in it:
``dlrm.preprocess.record``).

``manifest.json`` is written last, atomically, by ``dlrm preprocess``: a directory is a
complete dataset iff it holds one of this ``FORMAT``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlrm.errors import PreprocessError

MANIFEST = "manifest.json"
FORMAT = "dlrm-criteo-parquet/1"



def load_manifest(dataset: str | Path) -> dict[str, Any]:
    """Reads a dataset's manifest; a clear error if the dataset is missing or incomplete."""
    path = Path(dataset) / MANIFEST
    if not Path(dataset).is_dir():
        raise PreprocessError(f"dataset directory not found: {dataset}")
    if not path.is_file():
        raise PreprocessError(
            f"{path} not found: {dataset} is not a complete dataset (run `dlrm preprocess`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreprocessError(f"{path}: corrupt manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise PreprocessError(f"{path}: unknown format {manifest.get('format')!r}, want {FORMAT}")
    return manifest
