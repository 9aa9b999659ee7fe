"""Reading raw rows, shared by preprocessing and serving: chunks of input files, blocks of
parsed columns, rejects, Criteo's byte-level reader, declared readers and codecs, side
tables, vocabulary lookup, the layout of a dataset's columns and the row encoding."""
