"""The Criteo schema, shared by the generator, the preprocessor and the loader."""

NUM_DENSE = 13
NUM_SPARSE = 26
LABEL = "label"
DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
TSV_COLUMNS = [LABEL, *DENSE_NAMES, *SPARSE_NAMES]

# Categorical ids in a preprocessed dataset: 0 is "value missing", 1 "value seen too
# rarely to be in the vocabulary" (vocab encoding only), 2.. the vocabulary.
MISSING_ID = 0
OOV_ID = 1


def holdout_halves(num_rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges of the validation and test halves of a held-out source.

    The torchrec_dlrm convention: the last day's first half validates, its second half
    tests. The generator uses this too, to report the Bayes AUC of each half.
    """
    mid = num_rows // 2
    return (0, mid), (mid, num_rows)
