"""The scripts behind the `trl-noise-ppo` command: `train`, `evaluate` and `generate`."""
