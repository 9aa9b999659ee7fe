"""dlrm: distributed DLRM training on TorchRec for Criteo-style click logs."""

__version__ = "0.1.0"
