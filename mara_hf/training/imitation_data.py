"""The demonstrations an imitation run follows, and the decisions recorded along them.

For every prompt a demonstration is followed through MARA's own decoder (`rollouts.follow`, the loop SAC rollouts
run) with the decisions forced: at each step the candidates ranked above the demonstrated token are rejected and
that token is accepted, exactly what a "veto" agent must decide for greedy decoding to emit it. The LLM's state of
every judged candidate is recorded with its label (1 accept, 0 reject):

- harmful prompts (labelled as the `refusal` reward labels them) demonstrate a refusal that ends the turn
  (`ImitationConfig.refusals` + end of turn);
- benign prompts demonstrate the LLM's own greedy answer: every decision is "accept the top candidate";
- openings (the first tokens of more benign prompts), added prompts (`added`, repeated) and the benign prompts a
  `screen_agent` refuses (demonstrated as the LLM answers them) add to those.

A demonstration whose next token is not in the candidate set (top-k / top-p) cannot be followed: its row stops
being recorded from there (counted in the log). Decisions are written to `output_dir/decisions/` as they are
collected, under a fingerprint of the prompts and settings, so an interrupted run resumes where it stopped.
"""

import hashlib
import json
import os
import random

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..agent.modeling import MaraAgent
from ..data.encoding import encode_prompts
from ..decoding.rule import ALWAYS, DecisionRule
from ..rewards import RefusalReward
from ..utils import token_ids
from .imitation_config import ImitationConfig
from .rollouts import NoAgent, decision_arrays, follow, follow_tokens

logger = logging.get_logger(__name__)

WRITTEN = [os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", name)
           for name in ("benign_lookalikes.jsonl", "harmful_requests.jsonl")]
SHARD = 8  # rollout batches per decisions file


def written_requests() -> list[dict]:
    """The requests written for training that ship with mara-hf: benign look-alikes and harmful requests in
    everyday phrasing (records with `prompt` and `harmful`)."""
    records = []
    for path in WRITTEN:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def _digest(keys: dict) -> str:
    """A short fingerprint of collection settings (JSON-serialisable)."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


class Demonstrations:
    """Which prompts demonstrate what (seeded draws), and the forced decisions along them (`collect`).

    Args:
        model, tokenizer: the causal LM the agent is for, and its tokenizer (with a chat template for chat models).
        prompts: records with "prompt" and a harmful label (a `harmful` field or an HH-RLHF `source`).
        config: `ImitationConfig`.
        output_dir: where the decisions are written (`output_dir/decisions/`).
        added: more prompts, each demonstrated (`added_repeats` times), whatever the draws.
    """

    def __init__(self, model, tokenizer, prompts: list[dict], config: ImitationConfig, output_dir: str,
                 added: list[dict] | None = None):
        self.model, self.tokenizer, self.config, self.output_dir = model, tokenizer, config, output_dir
        rng = random.Random(self.config.seed)
        harmful = [r for i, r in enumerate(prompts) if RefusalReward.is_harmful(r, i)]
        benign = [r for i, r in enumerate(prompts) if not RefusalReward.is_harmful(r, i)]
        self.harmful = self._draw(rng, harmful, self.config.max_harmful)
        self.benign = self._draw(rng, benign, self.config.max_benign)
        if self.config.written_requests:
            written = written_requests() * self.config.written_repeats
            self.harmful += [r for r in written if r["harmful"]]
            self.benign += [r for r in written if not r["harmful"]]
            rng.shuffle(self.harmful)
            rng.shuffle(self.benign)
        # openings: drawn after everything above, from the benign prompts left, so the other draws stay as they were
        drawn = {r["prompt"] for r in self.benign}
        left = [r for r in benign if r["prompt"] not in drawn]
        self.openings = self._draw(random.Random(self.config.seed + 2), left, self.config.benign_openings)
        # prompts to screen for false refusals: drawn last, from the benign prompts no other draw took
        opened = {r["prompt"] for r in self.openings}
        left = [r for r in left if r["prompt"] not in opened]
        self.to_screen = (self._draw(random.Random(self.config.seed + 4), left, self.config.screen_benign)
                          if self.config.screen_agent else [])
        self.screened = []  # those the screen agent refused: known once `collect` has screened them
        if not self.harmful or not self.benign:
            raise ValueError(f"Imitation needs harmful and benign prompts; got {len(self.harmful)} harmful and "
                             f"{len(self.benign)} benign. Label prompt sets with harmful=true / harmful=false.")
        eos = model.generation_config.eos_token_id
        self.eos = token_ids(eos)
        if not self.eos:
            raise ValueError("The model's generation_config has no eos_token_id: a refusal cannot end the turn.")
        self.refusal_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos[0]]
                            for text in self.config.refusals]
        draws = random.Random(self.config.seed + 1)  # which refusal each harmful prompt demonstrates
        self.demo_of = [draws.randrange(len(self.refusal_ids)) for _ in self.harmful]
        # added prompts: every one, in the given order, with refusal draws of their own (the others stay as they were)
        added = list(added or [])
        self.added_harmful = [r for i, r in enumerate(added) if RefusalReward.is_harmful(r, i)]
        self.added_benign = [r for i, r in enumerate(added) if not RefusalReward.is_harmful(r, i)]
        draws = random.Random(self.config.seed + 3)
        self.added_demo_of = [draws.randrange(len(self.refusal_ids)) for _ in self.added_harmful]

    @staticmethod
    def _draw(rng, records, n):
        return list(records) if n is None or n >= len(records) else rng.sample(records, n)

    # ----- collection ---------------------------------------------------------------------------------------
    def _fingerprint(self, kind: str = "main") -> str:
        c = self.config
        if kind == "openings":
            keys = dict(opening_tokens=c.opening_tokens, top_k=c.top_k, top_p=c.top_p,
                        rollout_batch_size=c.rollout_batch_size, prompts=[r["prompt"] for r in self.openings],
                        model=getattr(self.model, "name_or_path", None))
        else:
            harmful, benign = {"added": (self.added_harmful, self.added_benign), "screened": ([], self.screened)}.get(
                kind, (self.harmful, self.benign))
            keys = dict(refusals=c.refusals, benign_tokens=c.benign_tokens, top_k=c.top_k, top_p=c.top_p,
                        rollout_batch_size=c.rollout_batch_size,
                        prompts=[r["prompt"] for r in harmful] + ["|"] + [r["prompt"] for r in benign],
                        model=getattr(self.model, "name_or_path", None))
        return _digest(keys)

    def _shard_dir(self) -> str:
        """The decisions folder, checked against these settings: each kind of demonstration (refusals and benign
        answers; openings) is recorded under a fingerprint of the prompts and settings it was collected with."""
        folder = os.path.join(self.output_dir, "decisions")
        os.makedirs(folder, exist_ok=True)
        stamp = os.path.join(folder, "settings.json")
        mine = {"fingerprint": self._fingerprint(), "harmful": len(self.harmful), "benign": len(self.benign)}
        if self.openings:
            mine.update(openings_fingerprint=self._fingerprint("openings"), openings=len(self.openings))
        if self.added_harmful or self.added_benign:
            mine.update(added_fingerprint=self._fingerprint("added"), added=len(self.added_harmful) +
                        len(self.added_benign))
        if self.screened:
            mine.update(screened_fingerprint=self._fingerprint("screened"), screened=len(self.screened))
        theirs = {}
        if os.path.isfile(stamp):
            with open(stamp) as f:
                theirs = json.load(f)
        for key in ("fingerprint", "openings_fingerprint", "added_fingerprint", "screened_fingerprint"):
            if key in mine and key in theirs and theirs[key] != mine[key]:
                raise ValueError(f"{folder!r} holds decisions collected with other prompts or settings: use another "
                                 "--output, or delete that folder to collect again.")
        if mine.keys() - theirs.keys():
            with open(stamp, "w") as f:
                json.dump({**theirs, **mine}, f)
        return folder

    def screen(self) -> list[dict]:
        """The prompts of `to_screen` that `screen_agent` opens with a refusal (greedy, `screen_tokens` tokens);
        kept in `output_dir/decisions/screened.json`, so a resumed run does not screen again."""
        from ..decoding.generate import generate
        from ..decoding.processor import MaraProcessor
        from ..rewards.refusal import is_refusal

        c = self.config
        agent = MaraAgent.from_pretrained(c.screen_agent).to(self.model.device)
        weights = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in agent.state_dict().values()))
        key = _digest(dict(screen_tokens=c.screen_tokens, top_k=c.top_k, top_p=c.top_p, agent=weights.hexdigest(),
                           prompts=[r["prompt"] for r in self.to_screen], model=getattr(self.model, "name_or_path", None)))
        folder = os.path.join(self.output_dir, "decisions")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "screened.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["fingerprint"] != key:
                raise ValueError(f"{path!r} was screened with another agent, prompts or settings: use another "
                                 "--output, or delete that file to screen again.")
            return [self.to_screen[i] for i in saved["refused"]]
        logger.warning(f"Screening {len(self.to_screen)} benign prompts for false refusals of {c.screen_agent!r} "
                       f"({c.screen_tokens} tokens each).")
        mara, tok, refused = MaraProcessor(agent, model=self.model), self.tokenizer, []
        bs = c.rollout_batch_size
        try:
            for i in tqdm(range(0, len(self.to_screen), bs), desc="screening", unit="batch"):
                batch = self.to_screen[i:i + bs]
                enc = encode_prompts(tok, [r["prompt"] for r in batch], device=self.model.device)
                out = generate(self.model, mara, enc["input_ids"], enc["attention_mask"], max_new_tokens=c.screen_tokens)
                texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                refused += [i + j for j, t in enumerate(texts) if is_refusal(t)]
        finally:
            mara.remove()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": key, "screened": len(self.to_screen), "refused": refused}, f)
        os.replace(tmp, path)
        logger.warning(f"{len(refused)} of {len(self.to_screen)} screened benign prompts were refused.")
        return [self.to_screen[i] for i in refused]

    def collect(self) -> dict:
        """Follow every demonstration; returns `states` `(N, hidden)` float16, `labels` (1 accept, 0 reject) and
        `harmful` (which demonstrations they came from), all decisions in order."""
        if self.to_screen and not self.screened:
            self.screened = self.screen()
        folder = self._shard_dir()
        bs = self.config.rollout_batch_size
        parts, followed = [], [0, 0]  # refusals followed to the end, refusals demonstrated
        kinds = (("harmful", self.harmful, self.demo_of), ("benign", self.benign, None), ("opening", self.openings, None),
                 ("added-harmful", self.added_harmful, self.added_demo_of), ("added-benign", self.added_benign, None),
                 ("screened", self.screened, None))
        for kind, records, demo_of in kinds:
            if not records:
                continue
            starts = range(0, len(records), bs * SHARD)
            todo = sum(min(len(records) - s, bs * SHARD) for s in starts
                       if not os.path.isfile(os.path.join(folder, f"{kind}-{s:06d}.pt")))
            if todo:
                logger.warning(f"Following {todo} {kind} demonstrations ({len(records)} in all).")
            bar = tqdm(total=len(records), desc=f"{kind} demonstrations", initial=len(records) - todo)
            for s in starts:
                path = os.path.join(folder, f"{kind}-{s:06d}.pt")
                if os.path.isfile(path):
                    part = torch.load(path, weights_only=True)
                else:
                    chunk = []
                    for i in range(s, min(s + bs * SHARD, len(records)), bs):
                        demos = None if demo_of is None else [self.refusal_ids[d] for d in demo_of[i:i + bs]]
                        chunk.append(self._follow(records[i:i + bs], demos, self.config.opening_tokens
                                                  if kind == "opening" else self.config.benign_tokens))
                        bar.update(len(chunk[-1]["followed"]))
                    part = {k: torch.cat([c[k] for c in chunk]) for k in ("states", "labels", "harmful", "followed")}
                    tmp = path + ".tmp"
                    torch.save(part, tmp)
                    os.replace(tmp, path)  # a shard exists only once complete
                parts += [part] * (self.config.added_repeats if kind.startswith(("added", "screened")) else 1)
                if kind.endswith("harmful"):
                    followed[0] += int(part["followed"].sum())
                    followed[1] += len(part["followed"])
            bar.close()
        out = {k: torch.cat([p[k] for p in parts]) for k in ("states", "labels", "harmful")}
        out["refusals_followed"] = followed
        logger.warning(f"{len(out['labels'])} decisions; refusals followed to the end: {followed[0]}/{followed[1]} "
                       "(a refusal whose next token falls outside the candidate set is recorded up to there).")
        return out

    @torch.no_grad()
    def _follow(self, records: list[dict], demos: list[list[int]] | None, benign_tokens: int) -> dict:
        """One batch of demonstrations: forced decisions through `rollouts.follow`, the states and labels recorded.
        `demos`: the refusal token ids per row of harmful requests; None: benign, `benign_tokens` of greedy answer."""
        model, n = self.model, len(records)
        prompts = [r["prompt"] for r in records]
        if demos is not None:  # harmful: accept exactly the refusal's token while it is a candidate
            done = follow_tokens(model, self.tokenizer, prompts, demos, eos=self.eos, top_k=self.config.top_k,
                                 top_p=self.config.top_p)
        else:  # benign: accept the top candidate at every step
            done = follow(model, self.tokenizer, NoAgent(), prompts, bars=lambda cands: ALWAYS,
                          rule=DecisionRule("first", fallback_index=0), max_new_tokens=benign_tokens, eos=self.eos,
                          top_k=self.config.top_k, top_p=self.config.top_p, chunk_size=8)
        decided = [d for row in done.decisions for d in row]  # row by row: each demonstration's decisions together
        hidden = model.config.get_text_config().hidden_size
        return {**decision_arrays(decided, [demos is not None] * len(decided), hidden, "harmful"),
                "followed": done.guide.completed.cpu() if demos is not None else torch.ones(n, dtype=torch.bool)}
