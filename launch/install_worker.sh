#!/usr/bin/env bash
# Install rexrag_jax on one TPU VM worker (run on every worker, e.g. through
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="bash rexrag_jax/launch/install_worker.sh"`).
# Creates .venv beside the checkout with the pinned stack plus jax[tpu]; idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
"$python" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 required, found {sys.version}"'
[ -x "$root/.venv/bin/python" ] || "$python" -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install -q -U pip
"$root/.venv/bin/python" -m pip install -q -e "$root[tpu,demo]" \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
"$root/.venv/bin/python" -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)'
