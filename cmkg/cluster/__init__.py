"""The Ray layer: Ray Train drivers (and, next, sweeps and the ablation runner)."""
