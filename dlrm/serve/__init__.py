"""Serving: the model directory format, export, the scorer and `dlrm predict`, request
rows, `dlrm recommend` and ranking metrics, the HTTP app."""
