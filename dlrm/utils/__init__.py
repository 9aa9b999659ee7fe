"""Small utilities every layer uses: atomic files and I/O faults, a heap, the host's
resources, worker pools, a directory's writer lock, the run's structured output."""
