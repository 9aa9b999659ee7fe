"""What a dataset is: the declared schema (its columns, encodings, joins, time periods),
the features downstream code reads, the manifest and its splits, its files' integrity."""
