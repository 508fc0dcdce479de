#!/usr/bin/env bash
# The accelerator benchmark as one command on a lent machine, with the image's own jax / flax.
#
# Installs the carried wheels (.whl/, from benchmarks/accelerator_prepare.sh) and our package, both
# --no-deps, into $SITE (nothing of the image is replaced), checks that the installed rexrag_jax imports
# there (its jax / flax version check included), then runs benchmarks/accelerator.py within $BUDGET
# seconds. Results: $OUT/accelerator.json (rewritten after every variant), accelerator.log, software.txt.
#
# Usage: bash benchmarks/accelerator_device.sh [accelerator.py arguments, e.g. --quick]
#   OUT (default benchmarks/results), BUDGET (default 420 s), PYTHON (default python3), SITE (/tmp/site)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
SITE=${SITE:-/tmp/site}
BUDGET=${BUDGET:-420}
if ! ls .whl/*.whl >/dev/null 2>&1 || [ ! -f .whl/minilm-shape/config.json ]; then
    echo "accelerator_device: .whl/ is missing or incomplete: run benchmarks/accelerator_prepare.sh and carry .whl" >&2
    exit 1
fi
mkdir -p "$OUT" "$SITE"
pip_install() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$@"; }
pip_install --upgrade --target "$SITE" .whl/*.whl
pip_install --upgrade --no-build-isolation --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# The installed package, imported away from this checkout: it must accept the image's jax / flax.
(cd / && "$PYTHON" - <<'EOF') | tee "$OUT/software.txt"
import importlib.metadata as md
import rexrag_jax
import jax
print("rexrag_jax", rexrag_jax.__version__, "from", rexrag_jax.__file__)
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers"):
    print(name, md.version(name))
print("devices", jax.devices())
EOF

set -o pipefail
timeout $((${BUDGET%.*} + 150)) "$PYTHON" benchmarks/accelerator.py --budget "$BUDGET" \
    --loop-encoder .whl/minilm-shape --out "$OUT/accelerator.json" "$@" 2>&1 | tee "$OUT/accelerator.log"
