"""Sweeps for `launch/sweep.py`: files defining `get_sweep()` (base config, entry, grid/runs, fixed overrides)."""
