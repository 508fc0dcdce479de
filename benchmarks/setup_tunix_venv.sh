#!/usr/bin/env bash
# Creates a separate virtualenv with Tunix (PyPI `google-tunix`) for benchmarks/tunix_decode.py, the
# peer that our decode benchmark calls as a subprocess. Kept apart from the project venv because
# google-tunix pins other transformers/tokenizers/safetensors versions than ours.
#
# Usage: bash benchmarks/setup_tunix_venv.sh [VENV_DIR]      (default: <repo>/.venv-tunix)
#
# Pins and why:
#   * jax/jaxlib 0.10.2 + flax 0.12.8: the project's versions; google-tunix 0.1.7 (newest on PyPI,
#     needs flax>=0.11.1) imports and samples with them. These three are installed WITH their
#     dependencies (numpy, scipy, optax, orbax-checkpoint, tensorstore, ...).
#   * google-tunix itself is installed with --no-deps. A full resolve (pip --dry-run) wants 106
#     packages (no torch, but datasets, tensorflow-datasets, pyarrow, transformers 5.12.1, numba +
#     llvmlite, kagglehub, qwix, grain, ...), none of which `import tunix`, tunix.generate.sampler or
#     tunix.models.qwen2 imports. The --no-deps list below is exactly what `import tunix` needs (its
#     __init__ imports the whole RL/SFT stack), found by importing until nothing was missing; the
#     versions are the ones that full resolve picked (2026-11, Python 3.11.7).
#   * safetensors<0.8: google-tunix 0.1.7 declares `safetensors<0.8`.
#   * `pip check` will list tunix's unmet, unused requirements; that is expected.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-tunix}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)

"${PIP[@]}" "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8"
"${PIP[@]}" --no-deps \
  "google-tunix==0.1.7" \
  "google-metrax==0.2.4" "clu==0.0.12" "tensorboardX==2.6.5" "wrapt==2.5.2" \
  "jaxtyping==0.3.11" "wadler-lindig==0.1.8" "tqdm==4.70.1" "huggingface_hub==1.33.0" \
  "sentencepiece==0.2.3" "pillow==13.0.0" "perfetto==0.59.1" \
  "pandas==3.1.1" "python-dateutil==4.0.0" "tzdata==2026.6" "safetensors==0.7.0"

# Smoke check: the modules the benchmark uses import, and no torch slipped in.
JAX_PLATFORMS=cpu "$VENV/bin/python" - <<'EOF'
import importlib.util, jax, flax, tunix
import tunix.generate.sampler, tunix.models.qwen2.model  # noqa: F401
assert importlib.util.find_spec("torch") is None, "torch must not be installed here"
print(f"tunix {tunix.__version__}, jax {jax.__version__}, flax {flax.__version__}: OK")
EOF
du -sh "$VENV"
