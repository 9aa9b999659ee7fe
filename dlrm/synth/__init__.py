"""`dlrm synth`: synthetic logs with a planted click model (Criteo's layout or a
schema's), with the Bayes-optimal AUC of each split."""
