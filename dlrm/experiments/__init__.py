"""Experiments over runs: `dlrm sweep` (Optuna), `dlrm report` and run comparison."""
