"""Parsed rows → the rows a model reads: the dataset's output schema (label, dense
features, one id or a bag of ids per categorical feature, the time). Preprocessing writes
them as shards; ``predict`` and ``serve`` score them straight away, so both encode alike.
"""

from __future__ import annotations

import pyarrow as pa

from dlrm.rows.blocks import Block, bag_array
from dlrm.rows.layout import Layout
from dlrm.rows.vocab import Encoder


def encode(block: Block, encoder: Encoder, layout: Layout) -> pa.Table:
    """The block's rows in ``layout``'s output schema, each categorical value turned into
    its id by ``encoder`` (a bag feature's values into a list of ids per row)."""
    arrays = [pa.array(block.label)] + [pa.array(x) for x in block.dense]
    for f, (values, mask) in enumerate(block.hex):
        if layout.multi[f]:  # mask: the length of each row's bag
            arrays.append(bag_array(encoder.ids(f, values), mask))
        else:
            arrays.append(pa.array(encoder.ids(f, values, mask)))
    if layout.time is not None:
        arrays.append(pa.array(block.time, pa.timestamp("s")))
    return pa.Table.from_arrays(arrays, schema=layout.output_schema())
