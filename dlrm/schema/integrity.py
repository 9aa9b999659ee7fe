"""Data files that are checked, not trusted.

Every Parquet file the tool writes carries page checksums (``WRITE``: CRC-32 of each data
page, in the page header) and every read here verifies them (``page_checksum_verification``),
so a flipped byte fails its page's read instead of handing back other numbers. The manifest
records each shard's size; a file that is missing or of another size is refused before
anything is read. The errors name the file and say what is wrong (:class:`DataError`, exit 2
at the command line).

:func:`check_ids` is the loader's check of a row group's ids against the manifest's
cardinalities: an id outside its table would otherwise be clamped to row 0 by fbgemm's
bounds check, silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlrm.errors import DataError
from dlrm.schema.features import MISSING_ID

WRITE: dict[str, Any] = {"write_page_checksum": True}  # for every pq.ParquetWriter


def _fault(path: Path, e: Exception) -> DataError:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "checksum" in message.lower() or "CRC" in message:
        return DataError(f"{path}: corrupt (a page fails its checksum: {message}); "
                         "recreate the dataset or restore the file")
    return DataError(f"{path}: unreadable Parquet ({message})")


def check_file(path: Path, size: int | None) -> None:
    """Raises DataError if ``path`` is missing or (``size`` given: the manifest's) of
    another size."""
    try:
        actual = Path(path).stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: missing (the manifest lists it)") from None
    if size is not None and actual != size:
        what = "truncated" if actual < size else "changed"
        raise DataError(f"{path}: {what}: {actual} bytes, the manifest records {size}")


def open_parquet(path: Path, size: int | None = None) -> pq.ParquetFile:
    """The file, its size checked, opened for reads that verify page checksums."""
    check_file(path, size)
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise _fault(path, e) from None


def read_row_group(file: pq.ParquetFile, path: Path, group: int, **kwargs: Any) -> pa.Table:
    try:
        return file.read_row_group(group, **kwargs)
    except (pa.ArrowException, OSError) as e:
        raise _fault(path, e) from None


def read_table(path: Path, size: int | None = None, **kwargs: Any) -> pa.Table:
    """``pq.read_table`` with the size and every page checksum checked."""
    check_file(path, size)
    try:
        return pq.read_table(path, page_checksum_verification=True, **kwargs)
    except (pa.ArrowException, OSError) as e:
        raise _fault(path, e) from None


def read_metadata(path: Path, size: int | None = None) -> pq.FileMetaData:
    check_file(path, size)
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        raise _fault(path, e) from None


def check_ids(ids: np.ndarray, cardinality: int, feature: str, path: Path,
              first_row: int, offsets: np.ndarray | None = None) -> None:
    """Raises DataError if an id of ``feature`` (rows from ``first_row`` of ``path``; a bag
    feature's ids flat, ``offsets`` their rows' list offsets) lies outside
    ``[0, cardinality)``, naming the first such id and its row."""
    if not ids.size:
        return
    # One pass: as unsigned, a negative id is larger than any table.
    if ids.astype(np.int64, copy=False).view(np.uint64).max() < cardinality:
        return
    bad = np.flatnonzero((ids < 0) | (ids >= cardinality))
    row = int(bad[0]) if offsets is None else int(np.searchsorted(offsets, bad[0], "right")) - 1
    raise DataError(f"{path}: feature {feature} has id {int(ids[bad[0]])} (row "
                    f"{first_row + row} of the file; {bad.size} such ids here) outside "
                    f"its table of {cardinality} (the manifest's cardinality): the data does "
                    "not match its manifest; `dlrm verify` checks the whole dataset")


def check_column_ids(column: Any, cardinality: int, feature: str, path: Path,
                     first_row: int) -> None:
    """:func:`check_ids` of a column as it is read: numpy ids, or an Arrow column of ids or
    of bags of ids (a null id is the missing one)."""
    if isinstance(column, np.ndarray):
        check_ids(column, cardinality, feature, path, first_row)
        return
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = None
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        offsets = column.offsets.to_numpy()
        offsets = offsets - offsets[0]
        column = column.flatten()  # respects a slice's offset, skips null bags
    ids = (pc.fill_null(column, MISSING_ID) if column.null_count else column).to_numpy()
    check_ids(ids, cardinality, feature, path, first_row, offsets)
