#!/usr/bin/env bash
# Install rexrag_jax on one TPU VM worker: `python launch/tpu.py install` unpacks the checkout into
# ~/rexrag_jax on every worker and runs this there on all of them at once (by hand:
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="bash rexrag_jax/launch/install_worker.sh"`).
# Creates .venv beside the checkout (the repo root is taken from this file's location) with the pinned
# stack plus the `tpu` and `demo` extras; idempotent. `tpu.py run` starts `.venv/bin/python -m ...` from it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && new_enough "$candidate"; then python="$candidate"; break; fi
  done
fi
if [ -z "$python" ] && command -v apt-get >/dev/null; then
  # The TPU VM images are Ubuntu 22.04, whose python3 is 3.10; its universe archive has 3.11.
  echo "$(hostname): installing python3.11 with apt-get" >&2
  sudo DEBIAN_FRONTEND=noninteractive apt-get -q update >/dev/null
  sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
    install python3.11 python3.11-venv >/dev/null
  python=python3.11
fi
if [ -z "$python" ] || ! new_enough "$python"; then
  echo "$(hostname): error: Python >= 3.11 required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

# A .venv left by an older Python (or a broken one) is rebuilt rather than pip-installed into.
if [ -e "$root/.venv" ] && ! new_enough "$root/.venv/bin/python"; then rm -rf "$root/.venv"; fi
[ -x "$root/.venv/bin/python" ] || "$python" -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install -q -U pip
"$root/.venv/bin/python" -m pip install -q -e "$root[tpu,demo]" \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
# On a multi-host slice this waits for every worker's TPU runtime, so run it on all workers together.
"$root/.venv/bin/python" -c 'import jax; print(f"process {jax.process_index()}/{jax.process_count()}:", jax.local_device_count(), "of", jax.device_count(), jax.devices()[0].platform, "devices")'
