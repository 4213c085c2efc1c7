"""The suite's own sequence-classification reward model: SmolLM2-135M-Instruct's body with a linear score head fitted
(Bradley-Terry) on HH-RLHF preference pairs, saved as a `LlamaForSequenceClassification` folder that `--reward
FOLDER` loads through the reward-model path (`mara_hf.rewards.HFRewardModel`), as any Hub reward model.

    python -m benchmarks.suite.reward_model --pairs hh-rlhf:harmless-base@test --output runs/hh-rm

The body stays SmolLM2's: only the head is fitted, on the features the reward-model path computes (the last
token's final hidden state of the pair in SmolLM2's chat template), so the head is a linear probe of what SmolLM2
already represents. A fifth of the pairs (seeded) is held out and the held-out accuracy (the share of pairs whose
chosen response scores higher) is printed and written to the folder's README.md.
"""

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from tqdm.auto import tqdm


def features(source, pairs, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled final hidden states `(n, hidden)` of the chosen and of the rejected responses, as the reward-model
    path reads them (the model's score head swapped for the identity)."""
    source.load()
    score = source.model.score
    source.model.score = torch.nn.Identity()
    try:
        out = {"chosen": [], "rejected": []}
        for start in tqdm(range(0, len(pairs), batch), desc="features", unit="batch"):
            part = pairs[start:start + batch]
            for key in out:
                out[key].append(source.logits([p["prompt"] for p in part], [p[key] for p in part]))
        return torch.cat(out["chosen"]), torch.cat(out["rejected"])
    finally:
        source.model.score = score


def fit_head(chosen: torch.Tensor, rejected: torch.Tensor, steps: int = 400, weight_decay: float = 1e-3) -> torch.Tensor:
    """The score weight `(hidden,)` maximising sum log sigmoid(w . (chosen - rejected)) - weight_decay |w|^2 (LBFGS
    from zero: deterministic)."""
    difference = (chosen - rejected).double()
    w = torch.zeros(difference.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = -torch.nn.functional.logsigmoid(difference @ w).mean() + weight_decay * w.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return w.detach().float()


def build(output: str, pairs_spec: str, limit: int | None, device: str, seed: int = 0) -> dict:
    from transformers import AutoModelForSequenceClassification

    from mara_hf.data.pairs import load_pairs
    from mara_hf.models import load_model
    from mara_hf.rewards import HFRewardModel

    started = time.perf_counter()
    pairs = load_pairs(pairs_spec, limit=limit)
    llm, tokenizer = load_model("embedded", device="cpu")
    config = copy.deepcopy(llm.config)
    config.num_labels, config.architectures = 1, None
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config)
    model.model.load_state_dict(llm.model.state_dict())
    torch.nn.init.zeros_(model.score.weight)
    with tempfile.TemporaryDirectory() as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        source = HFRewardModel(work, batch_size=16, device=device)
        chosen, rejected = features(source, pairs)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    held = order[:len(pairs) // 5]
    train = order[len(pairs) // 5:]
    w = fit_head(chosen[train], rejected[train])
    margin = (chosen - rejected) @ w
    report = {"pairs": pairs_spec, "train_pairs": len(train), "held_out_pairs": len(held),
              "train_accuracy": (margin[train] > 0).float().mean().item(),
              "held_out_accuracy": (margin[held] > 0).float().mean().item(),
              "seconds": round(time.perf_counter() - started)}
    with torch.no_grad():
        model.score.weight.copy_(w[None].to(model.score.weight.dtype))
    model.config.architectures = [type(model).__name__]
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    with open(os.path.join(output, "README.md"), "w") as f:
        f.write("# A harmlessness reward model for mara-hf's training suite\n\n"
                "SmolLM2-135M-Instruct with a linear score head fitted (Bradley-Terry, LBFGS, L2 1e-3) on "
                f"{len(train)} HH-RLHF preference pairs (`{pairs_spec}`), the body unchanged. Held-out accuracy "
                f"on {len(held)} pairs: {report['held_out_accuracy']:.3f} (train {report['train_accuracy']:.3f}). "
                "Made by `python -m benchmarks.suite.reward_model`.\n\n```json\n" + json.dumps(report, indent=2)
                + "\n```\n")
    # the folder scores through the reward-model path exactly as the fitted head says
    check = HFRewardModel(output, batch_size=16, device=device)
    sample = [pairs[int(i)] for i in held[:8]]
    scores = check.logits([p["prompt"] for p in sample], [p["chosen"] for p in sample])[:, 0]
    assert torch.allclose(scores, chosen[held[:8]] @ w, atol=1e-3), (scores, chosen[held[:8]] @ w)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite.reward_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="hh-rlhf:harmless-base@test",
                        help="preference pairs (a spec as imitate --pairs reads them; default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N pairs (default: all)")
    parser.add_argument("--output", default="runs/hh-rm", help="folder to write (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="where the features are computed (default: %(default)s)")
    args = parser.parse_args(argv)
    report = build(args.output, args.pairs, args.limit, args.device)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
