"""Config files (`get_config()` modules) and the files they name, read by the command-line tools.

This folder is also installed with the package, as `rexrag_jax._configs` (setup.py): a `configs/...` path
given to `rexrag-train` / `rexrag-eval` / `rexrag-demo` that does not exist in the working directory is
taken from that installed copy, so `--config configs/tiny_cpu.py` works from any directory.
"""
