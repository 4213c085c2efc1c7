"""Demonstrations chosen by a reward (best-of-N distillation): any reward becomes demonstrations to imitate.

For each prompt the LLM answers greedily and draws `samples` responses over MARA's candidate set (top-k, top-p, at
`sample_temperature`), with `generate` over several prompts at once; the reward sources score all of them. The best sample is demonstrated where it beats the
greedy answer by more than `margin`, the greedy answer itself otherwise, so what needs no change is kept. The
forced decisions that reproduce each demonstration (a token at rank k: k rejections, one accept; `rollouts.follow`),
of them the rejections the reward credits (`credit`, `RewardChosen.credited`), are what the agent is fitted to (`ImitationTrainer.fit`): an agent that makes the LLM write, without sampling
N times, what best-of-N would have picked.

Further rounds (expert iteration, `rounds`): round r draws with the agent of round r - 1 steering (the one line,
sampled: the LLM's draw among the candidates the agent accepts) and compares the draws with that agent's greedy answer,
which is kept where no draw beats it: the demonstrations improve on what the agent already does, and the next
agent is fitted to them. Best-of-N over a steered LLM reaches responses that best-of-N over the LLM alone rarely
draws.

The drawing and scoring is the expensive part: it is written batch by batch to `output_dir/demonstrations.jsonl`
(round r > 1: `demonstrations-round<r>.jsonl`; one line per prompt: prompt, chosen response, its score, the LLM's
greedy answer's score, which was chosen), so an interrupted run resumes where it stopped and the choices can be
read.
"""

import contextlib
import json
import os
import time

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data.encoding import encode_prompts, pad_id
from ..decoding.loop import check_fast
from ..decoding.processor import MaraProcessor
from ..models import placement
from ..rewards import combine
from ..utils import token_ids
from .imitation_data import _digest
from .rollouts import Decisions, decision_arrays, follow_tokens

logger = logging.get_logger(__name__)

FILE = "demonstrations.jsonl"
DRAWER = "generate"  # how the draws are made (in the fingerprint: files drawn otherwise are not resumed)
DRAW_ROWS = 4  # draws decoded together: this many times `rollout_batch_size` rows


class Drawer:
    """Draws and scores responses for batches of prompts (`choose_batch`): the expensive part of reward-chosen
    demonstrations, which `RewardChosen` runs here or on Ray workers (`ray_backend.RayDrawer`), batch by batch.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        rewards: reward sources (`mara_hf.rewards`); their weighted sum chooses.
        config: `ImitationConfig` (samples, sample_temperature, margin, response_tokens, top_k, top_p).
    """

    def __init__(self, model, tokenizer, rewards, config):
        self.model, self.tokenizer, self.rewards, self.config = model, tokenizer, list(rewards), config
        eos = model.generation_config.eos_token_id
        self.eos = token_ids(eos)

    def choose_batches(self, batches, agent=None):
        """`choose_batch` of every `(records, seed)` in `batches`, yielded in order."""
        for records, seed in batches:
            yield self.choose_batch(records, seed, agent)

    @torch.no_grad()
    def choose_batch(self, records: list[dict], seed: int, agent=None) -> list[dict]:
        """The chosen demonstration of each of `records`: draws seeded by `seed`, steered by `agent` (None: the LLM
        alone), compared with `agent`'s greedy answer (the LLM's without one)."""
        c, n = self.config, len(records)
        prompts = [r["prompt"] for r in records]
        enc = encode_prompts(self.tokenizer, prompts, device=self.model.device)
        greedy = self._generate(enc, agent=None)
        # the incumbent a draw must beat: the LLM's greedy answer, or in later rounds the steering agent's
        incumbent = greedy if agent is None else self._generate(enc, agent=agent)
        sampled = self._generate(enc, agent=agent, seed=seed)
        # rows: the LLM's greedy answers, the incumbents (later rounds), the draws
        parts = [greedy] + ([incumbent] if agent is not None else []) + [sampled]
        texts = [t for part in parts for t in part["texts"]]
        ids = [x for part in parts for x in part["ids"]]
        owners = [i for part in parts[:-1] for i in range(n)] + [i for i in range(n) for _ in range(c.samples)]
        total, _ = combine(self.rewards, [prompts[i] for i in owners], texts, [records[i] for i in owners])
        first_draw = n * (len(parts) - 1)
        lines = []
        for i in range(n):
            scores = [float(total[first_draw + i * c.samples + s]) for s in range(c.samples)]
            best = max(range(c.samples), key=lambda s: scores[s])
            held = i if agent is None else n + i  # the incumbent's row
            beats = scores[best] > float(total[held]) + c.margin
            row = first_draw + i * c.samples + best if beats else held
            line = {"prompt": prompts[i], "response": texts[row], "score": float(total[row]),
                    "greedy_score": float(total[i]), "sample_scores": scores,
                    "chosen": "sample" if beats else ("greedy" if agent is None else "agent"), "ids": ids[row],
                    "steered": ids[row] != ids[i]}  # parts from the LLM's own greedy answer
            if agent is not None:
                line["agent_score"] = float(total[held])
            lines.append(line)
        return lines

    def _generate(self, enc: dict, agent, seed: int | None = None) -> dict:
        """`generate` on the encoded prompts: greedy without `seed`; with it, `samples` draws per prompt over the
        candidate set (top-k, top-p) at `sample_temperature`, seeded. With `agent`, MARA decodes (greedy emits the
        most probable accepted candidate, sampling draws among the accepted ones), through `custom_generate` where the
        model allows it (the one line's tokens, with fewer forwards), else the one line. Returns the response texts
        and token ids (up to and with the first EOS)."""
        c = self.config
        kwargs = dict(max_new_tokens=c.response_tokens, pad_token_id=pad_id(self.tokenizer), do_sample=False)
        if seed is not None:
            kwargs.update(do_sample=True, temperature=c.sample_temperature, top_k=c.top_k, top_p=c.top_p,
                          num_return_sequences=c.samples)
        with contextlib.ExitStack() as stack:
            if agent is not None:
                mara = stack.enter_context(MaraProcessor(agent, model=self.model))
                try:  # MARA's own loop as generate's: the one line's tokens, fewer forwards in batches
                    check_fast(self.model)
                    kwargs["custom_generate"] = mara.custom_generate
                except NotImplementedError:
                    kwargs["logits_processor"] = [mara]
            if seed is not None:
                gpus = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=gpus))
                torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        ids = []
        for row in new.tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.eos), len(row))
            ids.append(row[:end])
        return {"texts": self.tokenizer.batch_decode(new, skip_special_tokens=True), "ids": ids}


def round_file(round: int) -> str:
    """The demonstrations file of round `round` (1-based)."""
    return FILE if round == 1 else f"demonstrations-round{round}.jsonl"


class RewardChosen:
    """Reward-chosen demonstrations of `prompts` (records with "prompt") for `model`, and the decisions along them.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        prompts: the training prompts (all of them are demonstrated).
        rewards: reward sources (`mara_hf.rewards`); their weighted sum chooses.
        config: `ImitationConfig` (samples, sample_temperature, margin, response_tokens, top_k, top_p,
            rollout_batch_size, seed).
        output_dir: where `demonstrations.jsonl` and the decisions go.
        agent: the agent that steers the draws and whose greedy answer is the incumbent (expert iteration's later
            rounds); None: the LLM alone.
        round: which round these demonstrations are (1-based): names the file.
        drawer: what draws and scores (`choose_batches`): a local `Drawer` by default, or Ray workers
            (`ray_backend.RayDrawer`).
    """

    def __init__(self, model, tokenizer, prompts: list[dict], rewards, config, output_dir: str, agent=None,
                 round: int = 1, drawer=None):
        if not prompts:
            raise ValueError("No prompts to demonstrate.")
        if not rewards:
            raise ValueError("Reward-chosen demonstrations need at least one reward source (--reward).")
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(prompts)
        self.rewards, self.config, self.output_dir = list(rewards), config, output_dir
        eos = model.generation_config.eos_token_id
        self.eos = token_ids(eos)
        self.agent, self.round = agent, round
        self.drawer = drawer or Drawer(model, tokenizer, rewards, config)
        self.lines = None  # the chosen demonstrations, once `choose` has them

    # ----- choosing ---------------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        c = self.config
        return _digest(dict(drawer=DRAWER, samples=c.samples, temperature=c.sample_temperature, margin=c.margin,
                            tokens=c.response_tokens, top_k=c.top_k, top_p=c.top_p, seed=c.seed,
                            rewards=[(r.name, r.multiplier) for r in self.rewards],
                            prompts=[r["prompt"] for r in self.prompts], model=getattr(self.model, "name_or_path", None)))

    def choose(self) -> list[dict]:
        """The chosen demonstration of every prompt, drawn and scored batch by batch (resuming from the file); kept
        once chosen."""
        if self.lines is not None:
            return self.lines
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, round_file(self.round))
        key = self._fingerprint()
        done = _read(path, key)
        c = self.config
        rows_per_batch = max(1, DRAW_ROWS * c.rollout_batch_size // c.samples)
        todo = list(range(len(done), len(self.prompts)))
        if todo:
            steer = f" (round {self.round}: the previous round's agent steering)" if self.agent is not None else ""
            logger.warning(f"Drawing {c.samples} responses for each of {len(todo)} prompts ({len(done)} done), "
                           f"{c.response_tokens} tokens each{steer}, and scoring them with {len(self.rewards)} reward "
                           "source(s).")
        started, bar = time.perf_counter(), tqdm(total=len(self.prompts), initial=len(done), desc="best-of-N",
                                                  unit="prompt")
        with open(path, "a") as sink:
            if not done:
                sink.write(json.dumps({"fingerprint": key}) + "\n")
            starts = range(0, len(todo), rows_per_batch)
            batches = [([self.prompts[j] for j in todo[i:i + rows_per_batch]], c.seed * 1_000_003 + todo[i])
                       for i in starts]
            for k, lines in enumerate(self.drawer.choose_batches(batches, self.agent)):
                for line in lines:  # written in the prompts' order, so a rerun resumes after the last line
                    sink.write(json.dumps(line) + "\n")
                    done.append(line)
                sink.flush()
                bar.update(len(lines))
                if k == 0 and len(batches) > 1:
                    left = (time.perf_counter() - started) * (len(todo) - len(lines)) / len(lines)
                    where = placement(self.model) if isinstance(self.drawer, Drawer) else "Ray workers"
                    logger.warning(f"Best-of-{c.samples}: about {left / 60:.1f} min more for the other prompts "
                                   f"(the LLM on {where}; less with parallel workers or a GPU).")
        bar.close()
        chosen = sum(line["chosen"] == "sample" for line in done)
        kept = "the agent's greedy answer" if self.agent is not None else "the greedy answer"
        logger.warning(f"{chosen} of {len(done)} prompts demonstrate a sample that beat {kept}; the others keep "
                       f"{kept}.")
        self.lines = done
        return done

    # ----- following --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> dict:
        """Choose (or read) the demonstrations and record the forced decisions that reproduce them: `states`
        `(N, hidden)` float16, `labels` (1 accept, 0 reject) and `steered` (decisions along a demonstration that
        differs from the LLM's greedy answer). With `credit="prefix"` a rejection is recorded only where the reward
        credits it (`credited`)."""
        lines, size = self.choose(), self.config.rollout_batch_size
        parts = [self._follow(lines[i:i + size], self.prompts[i:i + size]) for i in range(0, len(lines), size)]
        out = {k: torch.cat([p[k] for p in parts]) for k in ("states", "labels", "steered")}
        if self.config.credit == "prefix":
            kept, departures = sum(p["credited"][0] for p in parts), sum(p["credited"][1] for p in parts)
            logger.warning(f"Rejections the reward credits: {kept} of {departures} along the demonstrations (the "
                           "others, where the demonstration's token scores no better than the one it replaced, are "
                           "not taught).")
        return out

    def _follow(self, lines: list[dict], records: list[dict]) -> dict:
        done = follow_tokens(self.model, self.tokenizer, [line["prompt"] for line in lines],
                             [line["ids"] for line in lines], eos=self.eos, top_k=self.config.top_k,
                             top_p=self.config.top_p)
        decisions = done.decisions
        credited = (0, 0)
        if self.config.credit == "prefix":
            decisions, credited = self.credited(lines, records, decisions)
        decided = [(d, line.get("steered", line["chosen"] == "sample")) for line, row in zip(lines, decisions)
                   for d in row]
        out = decision_arrays([d for d, _ in decided], [m for _, m in decided],
                              self.model.config.get_text_config().hidden_size, "steered")
        out["credited"] = credited
        return out

    def credited(self, lines: list[dict], records: list[dict], decisions: list[list]) -> tuple[list[list], tuple]:
        """The decisions along `lines` with only the rejections the reward credits: where a demonstration takes a
        lower-ranked token, each candidate ranked above it is scored as the demonstration's prefix followed by that
        candidate, and its rejection is kept only when it scores below the prefix followed by the demonstration's
        token. A departure the reward does not pay for (a synonym, a different spelling of the same words) then
        teaches nothing, and the agent learns to reject only what the reward says is worse: the LLM's own choices
        stay everywhere else. Returns the filtered decisions and (rejections kept, rejections along departures)."""
        texts, owners, where = [], [], []  # one text per judged candidate of every departure
        for i, (line, row) in enumerate(zip(lines, decisions)):
            for j, d in enumerate(row):
                m = len(d.accepts)
                if m < 2 or not bool(d.accepts[-1]) or d.ids is None:
                    continue
                prefix = line["ids"][:d.token]
                texts += [self.tokenizer.decode(prefix + [int(c)], skip_special_tokens=True) for c in d.ids[:m]]
                owners += [i] * m
                where.append((i, j, len(texts) - m, m))
        if not where:
            return decisions, (0, 0)
        scores, _ = combine(self.rewards, [lines[i]["prompt"] for i in owners], texts, [records[i] for i in owners])
        out = [list(row) for row in decisions]
        kept = total = 0
        for i, j, start, m in where:
            d = decisions[i][j]
            demo = float(scores[start + m - 1])
            keep = torch.tensor([float(scores[start + k]) < demo for k in range(m - 1)] + [True])
            kept += int(keep.sum()) - 1
            total += m - 1
            out[i][j] = Decisions(d.token, d.states[keep], d.accepts[keep], d.logprobs, d.p_accept, d.ids)
        return out, (kept, total)


def _read(path: str, key: str) -> list[dict]:
    """The demonstrations already chosen in `path` with these settings ([] for a new file); another run's raises."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or lines[0].get("fingerprint") != key:
        raise ValueError(f"{path!r} holds demonstrations chosen with other prompts, rewards or settings: use another "
                         "--output, or delete that file to choose again.")
    return lines[1:]
