"""What the preprocessing workers know of a dataset's layout: its columns, which
categorical ones hold bags, each one's encoding, and how to read a chunk into blocks.

Every layout is a declared schema (Criteo's is ``configs/schemas/criteo.toml``). One whose
contents are Criteo's exact layout (``Schema.criteo_tsv``) reads through the byte-level fast
path (``criteo_tsv``) and is recorded as Criteo's datasets always were (one encoding for
all); any other through ``declared_reader``. Either stages its parsed rows between the
vocab encoding's two passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from dlrm.rows.blocks import Block
from dlrm.rows.chunks import Options, Task
from dlrm.rows.criteo_tsv import criteo_blocks
from dlrm.rows.declared_reader import declared_blocks, parquet_blocks
from dlrm.rows.vocab import Encoding
from dlrm.schema.declared import Schema, Time

BAGS = pa.list_(pa.int64())


@dataclass(frozen=True)
class Layout:
    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    multi: tuple[bool, ...]  # per categorical feature: a bag per row
    encodings: tuple[Encoding, ...]  # per categorical feature
    schema: Schema

    @classmethod
    def declared(cls, schema: Schema) -> Layout:
        features = schema.features()
        encodings = tuple(Encoding(c.encoding, c.min_frequency, c.max_vocab, c.buckets,
                                   c.size, c.eviction) for c in schema.categorical)
        return cls(features.label, features.dense, features.sparse,
                   tuple(c.multi for c in schema.categorical), encodings, schema)

    @property
    def criteo_tsv(self) -> bool:
        """Whether the schema is Criteo's exact layout: read by the byte-level fast path,
        staged and recorded in the manifest as Criteo's."""
        return self.schema.criteo_tsv

    @property
    def standardized(self) -> list[int]:
        """The dense features whose mean and std the manifest records."""
        return [j for j, d in enumerate(self.schema.dense) if d.transform == "standardize"]

    @property
    def time(self) -> Time | None:
        """The time column, by which the rows are laid out in periods."""
        return self.schema.time

    @property
    def regression(self) -> bool:
        return self.schema.kind == "regression"

    @property
    def vocab(self) -> bool:
        """Whether any feature needs the counting pass."""
        return any(e.type == "vocab" for e in self.encodings)

    def blocks(self, task: Task, opts: Options,
               progress: Callable[[int], None]) -> Iterator[Block]:
        if self.criteo_tsv:
            return criteo_blocks(task, opts, progress)
        read = parquet_blocks if self.schema.format == "parquet" else declared_blocks
        return read(task, opts, self.schema, progress)

    def output_schema(self) -> pa.Schema:
        label = pa.float32() if self.regression else pa.int8()
        time = [(self.time.column, pa.timestamp("s"))] if self.time else []
        return pa.schema([(self.label, label)] + [(c, pa.float32()) for c in self.dense]
                         + [(c, BAGS if m else pa.int64())
                            for c, m in zip(self.sparse, self.multi, strict=True)] + time)

    def encoding_json(self) -> dict:
        """The manifest's ``encoding``: Criteo's one for all, else one per feature."""
        if self.criteo_tsv:
            return self.encodings[0].to_json()
        return {c: e.to_json() for c, e in zip(self.sparse, self.encodings, strict=True)}
