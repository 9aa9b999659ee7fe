"""The training loader: a split's rows as `Batch(dense, KeyedJaggedTensor, labels)` per
rank (prefetched, multi-hot, OOV dropout), the checks of a run's splits, `dlrm verify`."""
