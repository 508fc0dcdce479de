"""Fake CPU devices for a process: one place that sets XLA's host device count (import-cheap: no jax).

`fake_cpu_devices(n)` must run before jax's backend starts (the first `jax.devices()`, array or jit), which
is why the CLIs call it first thing; afterwards the flag is read no more and has no effect.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

FLAG = "--xla_force_host_platform_device_count"
_SETTING = re.compile(re.escape(FLAG) + r"=\S*")


def fake_cpu_devices(count: int, environ: MutableMapping[str, str] | None = None) -> None:
    """Make XLA's CPU platform show `count` devices (tests, laptops: sharding without accelerators) by
    setting `--xla_force_host_platform_device_count` in `XLA_FLAGS`, replacing an earlier setting and
    keeping every other flag. `count` <= 0 changes nothing. `environ`: default `os.environ`."""
    if count <= 0:
        return
    env = os.environ if environ is None else environ
    others = _SETTING.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*others, f"{FLAG}={int(count)}"])
