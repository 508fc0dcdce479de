#!/usr/bin/env bash
# The package as a user installs it: a non-editable install (`pip install .`) used from a directory outside
# the checkout, so nothing can come from the source tree. Checks that the config files and their data are
# installed (rexrag_jax._configs) and found by relative `configs/...` paths, that the CLIs start, and that
# one tiny training step runs. Dependencies are not re-downloaded: the package alone goes into a temporary
# --target folder, and PYTHON's environment (.venv) supplies everything else.
#
#   bash .ci/check_install.sh [PYTHON]      (`make check-install`; PYTHON defaults to .venv/bin/python)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:-$root/.venv/bin/python}"
case "$py" in /*) ;; *) py="$root/$py" ;; esac
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
step() { echo "check-install [$((SECONDS - start))s]: $*"; }

# A copy of the checkout's files (tracked and new, not ignored ones): a build writes build/ and *.egg-info
# beside setup.py, and a stale build/ in the checkout could put removed modules into the wheel.
mkdir -p "$tmp/src" "$tmp/run"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z -co --exclude-standard |
     while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) |
    tar -C "$tmp/src" -xf -
else
  tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./workdir --exclude=./build \
    --exclude='*.egg-info' -cf - . | tar -C "$tmp/src" -xf -
fi
step "installing (pip install --no-deps --target, not editable)"
# Offline with the environment's setuptools when it can build wheels (>= 70.1; torch's install brings 84),
# else pip's isolated build environment (downloads setuptools).
offline=(--no-build-isolation --no-index)
"$py" -c "import setuptools.command.bdist_wheel" 2>/dev/null || offline=()
"$py" -m pip install -q --no-deps "${offline[@]}" --target "$tmp/site" "$tmp/src" 2>&1 |
  { grep -v "^WARNING: Location .* is ignored" || true; }
rm -rf "$tmp/src"  # nothing of the checkout is left to fall back on

cd "$tmp/run"  # outside the checkout: relative configs/... paths are not in the working directory
export PYTHONPATH="$tmp/site" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset XLA_FLAGS
"$py" - "$tmp/site" <<'PY'
import pathlib, sys
import rexrag_jax
from rexrag_jax.cli.components import configs_dir, resolve_path
site = pathlib.Path(sys.argv[1])
assert pathlib.Path(rexrag_jax.__file__).is_relative_to(site), f"imported {rexrag_jax.__file__}, not the install"
assert configs_dir().is_relative_to(site), configs_dir()
for rel in ("configs/tiny_cpu.py", "configs/eval_hf.py", "configs/exploration_prompts.txt",
            "configs/data/tiny_train.jsonl", "configs/data/tiny_corpus.jsonl", "configs/data/tiny_eval/nq/test.jsonl"):
    assert pathlib.Path(resolve_path(rel, "check")).is_relative_to(site), rel
print("installed package and configs:", site)
PY
step "--help of rexrag-demo, -eval, -train, -data"
help_lists() {  # TOOL FLAG: `TOOL --help` exits 0 and lists FLAG
  local text
  text="$("$tmp/site/bin/$1" --help)" || { echo "check-install: $1 --help failed" >&2; exit 1; }
  grep -q -e "$2" <<<"$text" || { echo "$text"; echo "check-install: $1 --help lacks $2" >&2; exit 1; }
}
help_lists rexrag-demo --pool_file
help_lists rexrag-eval --checkpoint
help_lists rexrag-train --workdir
help_lists rexrag-data build
# One whole training step (data build, MiniLM index, rollouts with searches, update, checkpoint) at the
# smallest sizes that still do all of it: one device instead of tiny_cpu's 8 fake ones (compiling for
# 8 costs most of the time on 2 cores), one search turn, 2 questions x 2 samples. These are the shapes of
# tests/test_train_cli.py's runs: after `make test`, whose compilation cache JAX_COMPILATION_CACHE_DIR
# names (Makefile), the programs are loaded rather than compiled.
step "rexrag-train --config configs/tiny_cpu.py (1 step, 1 device)"
out="$("$tmp/site/bin/rexrag-train" --config configs/tiny_cpu.py --workdir "$tmp/run/train" --config.steps=1 \
         --config.progress=False --config.cpu_devices=1 --config.mesh.data=1 --config.mesh.fsdp=1 \
         --config.mesh.tensor=1 --config.rollout.max_turns=1 --config.rollout.group_size=2 \
         --config.rollout.max_response_length=12 --config.data.batch_size=2 --config.checkpoint.every=1 2>&1)" ||
  { echo "$out"; echo "check-install: rexrag-train failed" >&2; exit 1; }
echo "$out" | tail -n 1
echo "$out" | tail -n 1 | grep -q '"last_step": 1' || { echo "$out"; echo "check-install: no step 1" >&2; exit 1; }
step "OK"
