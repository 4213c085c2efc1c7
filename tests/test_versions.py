"""The import-time version check (mara_hf/_compat.py) and the floors it shares with setup.cfg.

The versions are faked by monkeypatching `installed_version`; `import mara_hf` is re-run by executing the package's
`__init__.py` as a fresh module outside `sys.modules`, so nothing heavy is imported again (it stops at the check).
"""

import configparser
import importlib.util
import os
import re

import pytest

import mara_hf
from mara_hf import _compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_versions(monkeypatch, **versions):
    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version", lambda name: versions[name] if name in versions else real(name))


def import_mara_hf_again():
    """Run mara_hf/__init__.py once more, as `import mara_hf` would, without replacing the imported package."""
    init = mara_hf.__file__
    spec = importlib.util.spec_from_file_location("mara_hf", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_versions_pass():
    _compat.check_versions()


@pytest.mark.parametrize("name, have", [("transformers", "5.20.2"), ("transformers", "5.0.0"),
                                        ("transformers", "4.57.6"), ("torch", "2.5.1+cpu"), ("torch", "2.4.1")])
def test_too_old_raises_a_clear_import_error(monkeypatch, name, have):
    fake_versions(monkeypatch, **{name: have})
    needed = _compat.MIN_VERSIONS[name]
    with pytest.raises(ImportError) as raised:
        _compat.check_versions()
    message = str(raised.value)
    assert f"{name} {have} is installed" in message
    assert f"{name}>={needed}" in message
    assert f'pip install --upgrade "{name}>={needed}"' in message


def test_import_mara_hf_raises_with_too_old_transformers(monkeypatch):
    fake_versions(monkeypatch, transformers="5.20.0")
    with pytest.raises(ImportError, match=r"transformers 5\.20\.0 is installed.*pip install --upgrade"):
        import_mara_hf_again()


@pytest.mark.parametrize("transformers, torch", [("5.21.0", "2.6.0"), ("5.21", "2.6"), ("5.21.1", "2.6.0+cu124"),
                                                 ("5.25.0.dev0", "2.13.0+cpu"), ("6.0.0", "3.0.0a0")])
def test_new_enough_passes(monkeypatch, transformers, torch):
    fake_versions(monkeypatch, transformers=transformers, torch=torch)
    _compat.check_versions()


def test_missing_or_unreadable_versions_are_left_to_the_imports(monkeypatch):
    monkeypatch.setattr(_compat, "installed_version", lambda name: None)
    _compat.check_versions()
    fake_versions(monkeypatch, transformers="unknown", torch="")
    _compat.check_versions()


def test_release_numbers():
    assert _compat.release("2.13.0+cpu") == (2, 13, 0)
    assert _compat.release("5.25.0.dev0") == (5, 25, 0)
    assert _compat.release("5.21.0rc1") == (5, 21, 0)
    assert _compat.release("unknown") == ()


def test_floors_match_setup_cfg():
    """setup.cfg's install_requires declares the same floors that the import-time check enforces."""
    path = os.path.join(ROOT, "setup.cfg")
    if not os.path.exists(path):
        pytest.skip("no setup.cfg next to the tests")
    cfg = configparser.ConfigParser()
    cfg.read(path)
    requires = cfg["options"]["install_requires"]
    for name, needed in _compat.MIN_VERSIONS.items():
        declared = re.search(rf"^\s*{name}\s*>=\s*([0-9.]+)\s*$", requires, re.M)
        assert declared, f"setup.cfg declares no floor for {name}"
        assert padded(declared.group(1)) == padded(needed), (name, declared.group(1), needed)


def padded(version, width=4):
    numbers = _compat.release(version)
    return numbers + (0,) * (width - len(numbers))


def test_ci_tests_the_declared_lowest_transformers():
    """.ci/run's job on the oldest declared transformers runs exactly MIN_VERSIONS' release."""
    path = os.path.join(ROOT, ".ci", "run")
    if not os.path.exists(path):
        pytest.skip("no .ci/run next to the tests")
    lowest = re.search(r"^TRANSFORMERS_LOWEST=(\S+)$", open(path).read(), re.M)
    assert lowest, ".ci/run sets no TRANSFORMERS_LOWEST"
    assert padded(lowest.group(1)) == padded(_compat.MIN_VERSIONS["transformers"])
