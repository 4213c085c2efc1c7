"""Property tests of MARA decoding over widely varying inputs, every route against an independent computation.

Cases come from a seeded generator (case i is always the same case): a random tiny model (llama, GPT-NeoX, GPT-2;
some with tied LM-head rows, whose exactly equal logits make candidate sets wider than top_k), a random batch with
random left padding, one or two random agents (combined veto), a random candidate set (top_k, top_p), greedy,
sampled (a random subset of generate's warpers: temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff,
eta_cutoff) or beam search, and a route: `logits_processor=[mara]`, `custom_generate=mara.custom_generate` or
`mara_hf.generate`.

Every emitted token is checked at its step without MARA's code: the prefix run through the model with full
forwards (no cache), the candidate set from transformers' own TopK/TopP warpers, every candidate judged by the
agent on its own forward of prefix + candidate, and the sampling support from transformers' own warpers. The
token must be what the decoding rule allows (docs/decoding.md):
- greedy: the most probable accepted candidate, the most probable candidate when none is accepted;
- sampled veto: an accepted candidate in the warpers' support when there is one; else the most probable
  accepted candidate; else (every candidate rejected) a candidate in the support;
- beams: an accepted candidate, any candidate when none is accepted;
and above all never a candidate the agent rejected while it accepted another. Steps where the expectation hangs on
float rounding (a P(accept) within 1e-3 of its threshold, a candidate set or support that changes under a 1e-4
perturbation of the logits) are not judged; they are counted, and must stay few.

The quick tier runs QUICK cases; `-m slow` runs SLOW more.
"""

import pytest
import torch
from tiny_models import BUILDERS, FIRST_ID, calibrated_agent
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

import mara_hf
from mara_hf import MaraProcessor
from mara_hf.decoding.caches import cache_arg

QUICK, SLOW = 30, 240
VOCAB = 128

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ------------------------------------------------------------------------------------------------------- the cases
def make_case(i: int) -> dict:
    g = torch.Generator().manual_seed(1000 + i)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand(1, generator=g))

    mode, route = pick([("greedy", "processor"), ("greedy", "custom_generate"), ("greedy", "mara_hf.generate"),
                        ("sample", "processor"), ("sample", "processor"), ("sample", "processor"),
                        ("sample", "custom_generate"), ("sample", "custom_generate"), ("beams", "processor")])
    warpers = {}
    if mode == "sample":
        warpers = dict(temperature=round(uniform(0.3, 1.5), 2), top_k=pick([0, 0, 1, 2, 5, 50]),
                       top_p=pick([1.0, 0.95, 0.9, 0.6, 0.3]))
        extra = pick([None, None, "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"])
        if extra is not None:
            warpers[extra] = {"min_p": pick([0.05, 0.2, 0.5]), "typical_p": pick([0.3, 0.7, 0.95]),
                              "epsilon_cutoff": pick([3e-3, 0.02, 0.1]), "eta_cutoff": pick([3e-3, 0.02])}[extra]
    batch = pick([1, 1, 2, 3, 4])
    length = int(torch.randint(2, 9, (1,), generator=g))
    agents = [dict(seed=int(torch.randint(100, (1,), generator=g)), rate=round(uniform(0.1, 0.9), 2))
              for _ in range(pick([1, 1, 2]))]
    return dict(
        seed=i, arch=pick(sorted(BUILDERS)), tied=pick([False, False, True]), batch=batch, length=length,
        pads=[int(torch.randint(length - 1, (1,), generator=g)) if batch > 1 else 0 for _ in range(batch)],
        agents=agents, strategy=pick(["veto", "veto", "first"]) if len(agents) == 1 else "veto",  # combined: veto
        top_k=pick([2, 3, 5, 10, 40]), top_p=pick([0.7, 0.9, 0.95, 1.0]), mode=mode, route=route,
        warpers=warpers, num_beams=pick([2, 3]) if mode == "beams" else 1, new=int(torch.randint(4, 11, (1,),
                                                                                                 generator=g)))


def build_model(case):
    model = BUILDERS[case["arch"]](seed=case["seed"] % 7, vocab_size=VOCAB)
    ties = torch.arange(VOCAB)
    if case["tied"]:  # tokens 64.. share the LM-head rows of tokens 0..63: their logits are exactly equal
        ties[64:] = torch.arange(64)
        head = model.get_output_embeddings()
        with torch.no_grad():
            head.weight[64:] = head.weight[:64]
    return model, ties


def sampling_warpers(warpers) -> LogitsProcessorList:
    """generate's sampling warpers for these settings, in generate's order (built here from transformers' classes)."""
    w = LogitsProcessorList()
    if warpers.get("temperature", 1.0) != 1.0:
        w.append(TemperatureLogitsWarper(warpers["temperature"]))
    if warpers.get("top_k"):
        w.append(TopKLogitsWarper(warpers["top_k"]))
    if warpers.get("top_p", 1.0) < 1.0:
        w.append(TopPLogitsWarper(warpers["top_p"]))
    if "min_p" in warpers:
        w.append(MinPLogitsWarper(warpers["min_p"]))
    if "typical_p" in warpers:
        w.append(TypicalLogitsWarper(warpers["typical_p"]))
    if "epsilon_cutoff" in warpers:
        w.append(EpsilonLogitsWarper(warpers["epsilon_cutoff"]))
    if "eta_cutoff" in warpers:
        w.append(EtaLogitsWarper(warpers["eta_cutoff"], device="cpu"))
    return w


# ------------------------------------------------------------------------------------------ the independent judge
class Judge:
    """The expectation at one step, computed with full forwards and transformers' warpers only."""

    def __init__(self, model, agents, thresholds, top_k, top_p, warpers, ties):
        self.model, self.agents, self.thresholds = model, agents, thresholds
        self.top_k, self.top_p, self.warp = top_k, top_p, sampling_warpers(warpers)
        g = torch.Generator().manual_seed(7)
        # perturbations that keep exact ties (tied head rows) tied, as the model's own rounding does
        self.jitter = [torch.randn(len(ties), generator=g)[ties] * 1e-4 for _ in range(2)]
        self.ids = torch.arange(len(ties))

    def candidates(self, logits, tiebreak: int = 0):
        """The candidate set; `tiebreak` +1 / -1 orders tokens tied after top-k by id one way or the other, since
        which of several tied tokens top-p drops at its boundary is arbitrary (both must agree to judge a step)."""
        top_k = TopKLogitsWarper(self.top_k)(None, logits[None].clone())
        warped = TopPLogitsWarper(self.top_p)(None, top_k + tiebreak * 1e-6 * self.ids)[0]
        kept = torch.isfinite(warped).nonzero().flatten()
        return kept[logits[kept].argsort(descending=True, stable=True)].tolist()

    def support(self, logits):
        return set(torch.isfinite(self.warp(None, logits[None].clone())[0]).nonzero().flatten().tolist())

    def states(self, prefix, cands):
        """The last hidden state of prefix + each candidate, each candidate a row of its own: for a large model on a
        copy of the prefix's cache repeated per row (the same as full forwards, up to rounding)."""
        if self.model.config.get_text_config().hidden_size <= 64:  # a tiny model: full forwards, no cache
            rows = torch.cat([prefix[None].expand(len(cands), -1), torch.tensor(cands)[:, None]], dim=1)
            return self.model(input_ids=rows, output_hidden_states=True).hidden_states[-1][:, -1]
        first = self.model(input_ids=prefix[None], use_cache=True)
        cache = first["cache"] if "cache" in first else first.past_key_values  # renamed in transformers 5.24
        cache.batch_repeat_interleave(len(cands))
        out = self.model(input_ids=torch.tensor(cands)[:, None], **{cache_arg(self.model): cache}, use_cache=True,
                         output_hidden_states=True)
        return out.hidden_states[-1][:, -1]

    @torch.no_grad()
    def step(self, prefix: torch.Tensor) -> "dict | None":
        """C, A, S after `prefix` (1D, unpadded); None when rounding could change any of them."""
        logits = self.model(input_ids=prefix[None]).logits[0, -1, :len(self.ids)].float()
        cands = self.candidates(logits)
        support = self.support(logits)
        for j in self.jitter:
            if self.candidates(logits + j) != cands or self.support(logits + j) != support:
                return None
        if any(set(self.candidates(logits, tiebreak)) != set(cands) for tiebreak in (1, -1)):
            return None  # tokens tied at the top-p boundary: either may be the candidate
        accepted = set()
        if len(cands) > 1:
            states = self.states(prefix, cands)
            verdicts = []
            for agent, threshold in zip(self.agents, self.thresholds):
                p = agent(states).accept_prob.float()
                if bool(((p - threshold).abs() < 1e-3).any()):
                    return None
                verdicts.append(p > threshold)
            ok = torch.stack(verdicts).all(0)
            accepted = {c for c, a in zip(cands, ok.tolist()) if a}
        return dict(cands=cands, accepted=accepted, support=support)


def allowed_tokens(expect: dict, mode: str, strategy: str) -> set:
    """The tokens the rule allows at a step (see the module docstring)."""
    cands, accepted, support = expect["cands"], expect["accepted"], expect["support"]
    if len(cands) == 1:
        return {cands[0]}
    first_accepted = next((c for c in cands if c in accepted), None)
    if mode == "greedy" or strategy == "first":
        return {first_accepted if first_accepted is not None else cands[0]}
    if mode == "beams":
        return accepted or set(cands)
    drawable = accepted & support
    if drawable:
        return drawable
    if accepted:
        return {first_accepted}
    return (set(cands) & support) or {cands[0]}


# --------------------------------------------------------------------------------------------------- the property
def run_case(case) -> tuple[int, int, int]:
    """Decode the case on its route and judge every emitted token. Returns the steps judged, the steps skipped, and
    the steps judged whose candidate set was wider than top_k (ties)."""
    model, ties = build_model(case)
    agents = [calibrated_agent(model, seed=a["seed"], rate=a["rate"]) for a in case["agents"]]
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.randint(FIRST_ID, VOCAB, (case["batch"], case["length"]), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(case["pads"]):
        mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    mara = MaraProcessor(agents if len(agents) > 1 else agents[0], model=model, top_k=case["top_k"],
                         top_p=case["top_p"], strategy=case["strategy"])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=case["new"], pad_token_id=0)
    torch.manual_seed(case["seed"])
    with mara:
        if case["route"] == "mara_hf.generate":
            out = mara_hf.generate(model, mara, ids, mask, max_new_tokens=case["new"])
        else:
            how = (dict(logits_processor=[mara]) if case["route"] == "processor"
                   else dict(custom_generate=mara.custom_generate))
            out = model.generate(**kwargs, do_sample=case["mode"] == "sample", num_beams=case["num_beams"],
                                 **case["warpers"], **how)
    judge = Judge(model, agents, [a.config.threshold for a in agents], case["top_k"], case["top_p"],
                  case["warpers"], ties)
    judged = skipped = wide = 0
    for row in range(out.shape[0]):
        prompt = ids[row][mask[row].bool()]
        new = out[row, ids.shape[1]:]
        for t in range(len(new)):
            expect = judge.step(torch.cat([prompt, new[:t]]))
            if expect is None:
                skipped += 1
                continue
            token = int(new[t])
            allowed = allowed_tokens(expect, case["mode"], case["strategy"])
            assert token in allowed, (case, row, t, token, expect)
            if expect["accepted"]:  # never a rejected candidate while another was accepted
                assert token in expect["accepted"], (case, row, t, token, expect)
            judged += 1
            wide += len(expect["cands"]) > case["top_k"]
    return judged, skipped, wide


def check_cases(cases):
    judged = skipped = wide = 0
    for i in cases:
        j, s, w = run_case(make_case(i))
        judged, skipped, wide = judged + j, skipped + s, wide + w
    # few steps left unjudged for rounding, and ties that widen the candidate set among the judged ones
    assert skipped <= 0.15 * (judged + skipped), (judged, skipped)
    assert wide >= 5, wide
    return judged


def test_every_route_emits_only_what_the_rule_allows_quick():
    assert check_cases(range(QUICK)) > 5 * QUICK


@pytest.mark.slow
def test_every_route_emits_only_what_the_rule_allows_many_cases():
    assert check_cases(range(QUICK, QUICK + SLOW)) > 5 * SLOW


def test_the_cases_cover_what_they_claim():
    """The generator reaches every mode, route, warper and candidate sets wider than top_k (tied head rows)."""
    cases = [make_case(i) for i in range(QUICK)]
    assert {c["mode"] for c in cases} == {"greedy", "sample", "beams"}
    assert {c["route"] for c in cases} == {"processor", "custom_generate", "mara_hf.generate"}
    assert {k for c in cases for k in c["warpers"]} >= {"temperature", "top_k", "top_p"}
    assert any(len(c["agents"]) == 2 for c in cases) and any(c["tied"] for c in cases)
    assert any(c["batch"] > 1 and len(set(c["pads"])) > 1 for c in cases)


@pytest.mark.slow  # SmolLM2 with the shipped agent
def test_the_shipped_agent_under_chat_sampling_never_emits_a_rejected_token():
    """The one line as a user writes it: the shipped agent, chat-formatted harmful requests in a left-padded batch,
    `do_sample=True, temperature=0.6, top_p=0.9, top_k=0` (settings that often leave one token on a confident
    step, and candidate sets wider than generate's top-k). Every step of every row is judged again with full
    forwards: never a candidate the agent rejected while it accepted another."""
    from mara_hf import load_embedded_model
    from mara_hf.data.prompts import load_prompts

    try:
        model, tokenizer = load_embedded_model()
    except ImportError as err:
        pytest.skip(f"embedded model not installed: {err}")
    torch.set_num_threads(2)  # a real model: both cores (the module's fixture set one for the tiny ones)
    requests = [p["prompt"] for p in load_prompts("mara-hf:harmful")][:4]
    enc = tokenizer.apply_chat_template([[{"role": "user", "content": r}] for r in requests],
                                        add_generation_prompt=True, return_tensors="pt", padding=True,
                                        return_dict=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    warpers = dict(temperature=0.6, top_p=0.9, top_k=0)
    with MaraProcessor.from_pretrained("smollm2-135m-refusal", model=model) as mara:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=True,
                             logits_processor=[mara], pad_token_id=tokenizer.pad_token_id, **warpers)
        agent, top_k, top_p = mara.agent, mara.top_k, mara.top_p
    vocab = len(tokenizer)
    judge = Judge(model, [agent], [agent.config.threshold], top_k, top_p, warpers, torch.arange(vocab))
    judged = skipped = steered = 0
    eos = tokenizer.eos_token_id
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()]
        new = out[row, ids.shape[1]:].tolist()
        new = new[:new.index(eos) + 1] if eos in new else new
        for t, token in enumerate(new):
            expect = judge.step(torch.cat([prompt, torch.tensor(new[:t], dtype=torch.long)]))
            if expect is None:
                skipped += 1
                continue
            assert token in allowed_tokens(expect, "sample", "veto"), (row, t, token, expect)
            judged += 1
            steered += bool(expect["accepted"]) and expect["cands"][0] not in expect["accepted"]
    assert judged > 40 and skipped <= 0.1 * (judged + skipped)
    assert steered > 0  # the agent vetoed the LLM's most probable token somewhere
