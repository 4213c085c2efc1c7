"""The training suite's quick version (`python -m benchmarks.suite --quick`), as CI runs it: two held-out tasks,
every training path at small sizes, each judged by its frontier on prompts no run saw. The full suite is a
benchmark (docs/training.md); this checks that it runs end to end and that its numbers hold together."""

import json

import pytest

from benchmarks.suite import run
from benchmarks.suite.tasks import FAMILIES, HELD_OUT, TUNE, oracle, prompts, tiny_tokenizer


def test_tune_and_held_out_tasks_are_apart():
    tune, held = {(t.family, t.seed) for t in TUNE}, {(t.family, t.seed) for t in HELD_OUT}
    assert len(TUNE) + len(HELD_OUT) >= 8 and not tune & held
    assert {t.seed for t in TUNE}.isdisjoint({t.seed for t in HELD_OUT})  # no LLM is shared either
    assert {t.family for t in TUNE + HELD_OUT} == set(FAMILIES)


@pytest.mark.parametrize("task", HELD_OUT[:3], ids=lambda t: t.name)
def test_the_best_agent_beats_greedy_decoding(task):
    """The computed best agent leaves room to learn: it scores above the LLM's greedy answers."""
    import torch

    model, tokenizer = task.model(), tiny_tokenizer()
    records = prompts(12, seed=5)
    enc = tokenizer([r["prompt"] for r in records], return_tensors="pt")  # one token a word: no padding
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)
    base = sum(task.reward(None, tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                        skip_special_tokens=True))) / len(records)
    assert oracle(task, model, tokenizer, records, 10, top_k=40) > base


def test_quick_suite(tmp_path, capsys, one_thread):
    output = tmp_path / "suite.jsonl"
    assert run.main(["--quick", "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["task"], r["method"]) for r in rows] == [(t.name, m) for t in run.QUICK for m in run.METHODS]
    printed = capsys.readouterr().out
    for r in rows:
        assert r["verdict"] in ("gain", "no gain", "reward hack") and r["verdict"] in printed
        assert r["gain"] == pytest.approx(r["mara"]["reward"] - r["base"]["reward"])
    assert "tasks x 3 paths in" in printed


def test_set_changes_only_the_paths_whose_config_has_the_field():
    """`--set FIELD=VALUE` is read as the field's type, for the paths whose config has it; an unknown field or a
    list-valued one is refused rather than silently misread."""
    assert run.parse_settings("reward-chosen", ["sample_temperature=0.5", "rounds=1", "credit=all"]) == {
        "sample_temperature": 0.5, "rounds": 1, "credit": "all"}
    assert run.parse_settings("sac", ["sample_temperature=0.5", "gamma=0.9"]) == {"gamma": 0.9}
    assert run.parse_settings("sac", ["overlap_updates=false"]) == {"overlap_updates": False}
    for bad in (["no_such_field=1"], ["rounds"], ["agent_hidden_dims=64"]):
        with pytest.raises(SystemExit):
            run.parse_settings("reward-chosen", bad)
