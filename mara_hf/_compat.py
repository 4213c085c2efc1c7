"""The oldest transformers and torch that mara-hf declares (setup.cfg `install_requires`), checked at import.

Older transformers releases fail far from the cause (deep inside `generate`, or by taking a slow path without
saying why), so `import mara_hf` with one of them raises an ImportError that says what is installed, what is
needed and how to fix it. The versions are read from the installed distributions' metadata, before transformers
or torch is imported (a too-old torch can break `import transformers` itself).

transformers 5.21 is the oldest release the processor, agent and compatibility tests pass with (CI runs them on
exactly that release, `.ci/run`); keep MIN_VERSIONS, setup.cfg and that CI job in step. torch 2.6 is the oldest
torch those transformers releases use at all: below it they log "Disabling PyTorch" and offer no models.
"""

import importlib
import re
from importlib import metadata

MIN_VERSIONS = {"transformers": "5.21.0", "torch": "2.6"}


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:  # importable without distribution metadata (a source checkout on sys.path, ...)
        return getattr(importlib.import_module(name), "__version__", None)
    except ImportError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "2.13.0+cpu" -> (2, 13, 0), "5.25.0.dev0" -> (5, 25, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _padded(numbers: tuple[int, ...], width: int) -> tuple[int, ...]:
    return numbers + (0,) * (width - len(numbers))


def check_versions() -> None:
    """Raise ImportError when transformers or torch is older than MIN_VERSIONS. A package that is not installed
    is left to the import that needs it (its ModuleNotFoundError is clear already), and so is a version string
    without release numbers."""
    for name, needed in MIN_VERSIONS.items():
        have = installed_version(name)
        if have is None or not release(have):  # not installed, or a version string this cannot read
            continue
        width = max(len(release(have)), len(release(needed)))
        if _padded(release(have), width) < _padded(release(needed), width):
            raise ImportError(
                f"mara-hf needs {name}>={needed}, but {name} {have} is installed. "
                f"Upgrade it with: pip install --upgrade \"{name}>={needed}\"")
