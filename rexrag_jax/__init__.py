"""rexrag_jax: REX-RAG (reasoning exploration with policy correction) for search agents, in JAX.

Pipeline: models/ -> rollout/ -> rl/ <- data/, with retrieval/ beside the rollout. Importing the package
has no side effects beyond one check: the installed jax and flax must lie in `SUPPORTED_VERSIONS`
(read from the installed packages' metadata, without importing them; docs/install.md). Subpackages are
imported where used.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# The jax / flax releases this code runs on: [lowest, below). setup.py's install_requires reads this table
# (one source of truth); constraints.txt holds the exact set CI tests (jax 0.10.2, flax 0.12.8).
SUPPORTED_VERSIONS = {
    "jax": ("0.10.2", "0.12"),
    "flax": ("0.12.8", "0.13"),
}
# Set to 1 to import with a jax / flax outside SUPPORTED_VERSIONS anyway (at your own risk).
SKIP_CHECK_ENV = "REXRAG_SKIP_VERSION_CHECK"


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string: "0.11.2" -> (0, 11, 2), "0.12.10.dev20260101+cuda" ->
    (0, 12, 10), "1.0rc1" -> (1, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # "0rc1": a pre-release tag ends the release part
            break
    return tuple(parts)


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _importable(name: str) -> bool:
    """Whether `name` can be imported (found without importing it: no metadata, e.g. a vendored copy)."""
    from importlib.util import find_spec

    return find_spec(name) is not None


def version_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """One message per package of `SUPPORTED_VERSIONS` that is missing or outside its range (empty: all
    fine). `versions`: name -> installed version (None: not installed); default: the installed ones."""
    problems = []
    for name, (low, high) in SUPPORTED_VERSIONS.items():
        installed = versions.get(name) if versions is not None else _installed_version(name)
        supported = f">={low},<{high}"
        if installed is None and versions is None and _importable(name):
            continue  # importable without package metadata: the version cannot be told, let it be
        if installed is None:
            problems.append(
                f"{name} is not installed (rexrag_jax supports {name}{supported}); pip install '{name}{supported}'"
            )
        elif not _release(low) <= _release(installed) < _release(high):
            problems.append(f"{name} {installed} is installed, but rexrag_jax supports {name}{supported}")
    return problems


def check_versions(versions: dict[str, str | None] | None = None) -> None:
    """ImportError naming each unsupported jax / flax, the supported range and the fixes."""
    problems = version_problems(versions)
    if problems:
        ranges = " ".join(f"'{name}>={low},<{high}'" for name, (low, high) in SUPPORTED_VERSIONS.items())
        raise ImportError(
            f"{'; '.join(problems)}. Fix: pip install {ranges} (the tested set: pip install -c "
            f"constraints.txt ., see docs/install.md), or set {SKIP_CHECK_ENV}=1 to try this "
            "combination anyway"
        )


if os.environ.get(SKIP_CHECK_ENV, "") not in ("1", "true", "yes"):
    check_versions()
