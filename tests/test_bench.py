"""mara-hf bench: what it reports besides time. Token agreement is checked here; speed never is (benchmarks print
ratios measured side by side, tests do not time anything)."""

import pytest

from mara_hf.evaluation.bench import format_rollout_table, format_table, run_bench, run_rollout_bench, token_agreement
from training_helpers import make_prompts, save_tiny_model


def test_token_agreement_counts_matching_positions_of_the_reference():
    assert token_agreement([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == 1.0
    assert token_agreement([[1, 9, 3], [4, 5]], [[1, 2, 3], [4]]) == 3 / 4  # one of 4 reference tokens differs
    assert token_agreement([[1]], [[1, 2]]) == 1 / 2  # a shorter output misses the rest
    assert token_agreement([[1], [2]], [[1]]) == 1.0  # only the prompts both cover (serial may run on fewer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_batched_methods_give_the_serial_tokens_in_float32(model_dir):
    """Batching (two prompts at once, left-padded) changes no token: the processor and the fast path match the
    serial reference, which decodes one prompt at a time."""
    prompts = [r["prompt"] for r in make_prompts(2, seed=5, length=3) + make_prompts(2, seed=6, length=7)]
    results = run_bench(model=model_dir, prompts=[prompts[0], prompts[2], prompts[1], prompts[3]], num_prompts=4,
                        max_new_tokens=8, batch_size=2, top_k=10)
    for name in ("processor", "custom_generate", "fast", "serial"):
        assert results["methods"][name]["same_as_serial"] == 1.0, name
        assert results["methods"][name]["same_as_processor"] == 1.0, name
    assert results["methods"]["plain"]["same_as_processor"] < 1.0  # the untrained agent changes the text
    assert "=serial" in format_table(results)
    # sampled rows: the two MARA routes draw the same tokens from the same seeds
    assert results["sampled_routes_match"] and results["methods"]["custom sampled"]["same_as_processor"] == 1.0
    assert results["methods"]["plain sampled"]["same_as_processor"] < 1.0


def test_rollout_bench_reports_episodes_per_hour_per_setting(model_dir):
    results = run_rollout_bench(model=model_dir, prompts=[r["prompt"] for r in make_prompts(3, seed=2)],
                                max_new_tokens=(4, 6), batch_sizes=(2,), mdps=("veto", "chain"))
    runs = results["runs"]
    assert [(r["mdp"], r["batch_size"], r["max_new_tokens"]) for r in runs] == [
        ("veto", 2, 4), ("veto", 2, 6), ("chain", 2, 4), ("chain", 2, 6)]
    for r in runs:
        assert 0 < r["tokens_per_episode"] <= r["max_new_tokens"]
        assert r["episodes_per_hour"] == pytest.approx(3600 / r["round_s_per_episode"])
        # the default recipe runs a round's updates beside the next rollouts, the authors' after them
        assert r["overlap_updates"] == (r["mdp"] == "veto")
        if not r["overlap_updates"]:
            assert r["round_s_per_episode"] == pytest.approx(r["rollout_s_per_episode"] + r["learner_s_per_episode"])
        assert r["round_s_per_episode"] > 0
    # the paper preset's learner runs 10 updates of 1024 transitions per episode, the default recipe 10 of 256
    assert {(r["mdp"], r["learner_batch_size"], r["updates_per_episode"]) for r in runs} == {
        ("veto", 256, 10), ("chain", 1024, 10)}
    # the chain scores every candidate, veto only those visited up to the accept: more decisions per token
    chain = sum(r["decisions_per_token"] for r in runs if r["mdp"] == "chain")
    assert chain > sum(r["decisions_per_token"] for r in runs if r["mdp"] == "veto")
    table = format_rollout_table(results)
    assert "episodes/h" in table and len(table.splitlines()) == 2 + len(runs)


def test_cli_takes_several_lengths_and_batch_sizes_only_with_rollouts(capsys):
    from mara_hf.cli.app import main

    assert main(["bench", "--batch-size", "8", "32"]) == 2  # before any model is loaded
    assert "--batch-size takes one value (several only with --rollouts)" in capsys.readouterr().err
    for flag in ("--batch-size", "--num-prompts", "--max-new-tokens"):
        assert main(["bench", flag, "0"]) == 2
        assert capsys.readouterr().err.strip().endswith(f"{flag} must be >= 1, got 0.")


def test_half_precision_run_reports_agreement_with_the_float32_processor(model_dir):
    """In bfloat16 the float32 processor is loaded the way the benchmarked model was, and every method's tokens
    are compared with it; the half-precision methods still agree with each other exactly."""
    prompts = [r["prompt"] for r in make_prompts(2, seed=5, length=3)]
    results = run_bench(model=model_dir, prompts=prompts, num_prompts=2, max_new_tokens=6, top_k=10,
                        dtype="bfloat16")
    assert results["dtype"] == "bfloat16"
    for name in ("processor", "custom_generate", "fast", "serial"):
        assert 0.0 <= results["methods"][name]["same_as_float32_processor"] <= 1.0
        assert results["methods"][name]["same_as_serial"] == 1.0, name
    assert "=fp32 proc" in format_table(results)


def test_the_old_bench_prompts_flag_still_works_with_a_deprecation(capsys, caplog):
    import logging

    from mara_hf.cli.app import build_parser, main

    assert build_parser().parse_args(["bench", "--prompts", "3"]).num_prompts == 3
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        assert main(["bench", "--prompts", "0"]) == 2  # taken as the count, then refused: no model loaded
    assert any("use --num-prompts" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().err.strip().endswith("--num-prompts must be >= 1, got 0.")


def test_chunk_size_takes_auto_all_or_a_count(caplog, capsys):
    import logging

    from mara_hf.cli.app import build_parser

    parse = lambda value: build_parser().parse_args(["bench", "--chunk-size", value]).chunk_size  # noqa: E731
    assert (parse("auto"), parse("all"), parse("3")) == ("auto", "all", 3)
    with caplog.at_level(logging.WARNING, logger="mara_hf"):
        assert parse("0") == "all"  # the earlier spelling, deprecated
    assert any("use --chunk-size all" in r.getMessage() for r in caplog.records)
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit):
            parse(bad)
        assert "expected auto, all or a count >= 1" in capsys.readouterr().err
