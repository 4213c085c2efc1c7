"""`MaraProcessor`: MARA decoding as a `LogitsProcessor`, so `model.generate(..., logits_processor=[mara])` aligns.

At every step the processor builds the candidate set from the scores it receives, computes the states of all
candidates of all rows in one batched forward on `generate`'s own KV cache (seen through a forward pre-hook),
asks the agent, and leaves only the chosen token possible, so greedy, sampling and beam search all emit it.

Lookahead: the chosen candidate's state gives, through the LM head, the next step's logits, hence its likely
candidates. Those ride along in generate's next forward (extra query positions with a tree mask; the cache is
cropped back and only the real token's logits are kept), so most steps need no forward of their own. The
speculated states are used only for candidates whose ids match the set built from the real scores.
"""

import weakref

import torch
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging

from .caches import (MasksUnsupported, cache_arg, cache_from_kwargs, Scratch, accepts_mask_dict, layer_layout, room, seq_length, shareable,
                     tree_masks)
from .candidates import (ChunkFit, candidate_set, check_chunk_size, decided_all, judge_candidates,
                         next_positions, score_rows, transforms_logits)
from ..agent.configuration import check_decoding_settings
from ..agent.modeling import MaraAgent
from .stats import MaraStats

logger = logging.get_logger(__name__)


class MaraProcessor(LogitsProcessor):
    r"""
    Aligns any causal LM at decoding time with a MARA agent.

    Args:
        agent ([`MaraAgent`] or a list of them): the accept/reject agent; moved to the model's device (it keeps its
            own dtype). A list combines veto agents (e.g. a safety agent and a style agent): a candidate stays when
            every agent accepts it, each at its own threshold (with `decision="sample"`, with the product of their
            P(accept)), and the LLM decodes among those, all of them when none stays. They share one candidate set
            (top_k, top_p) and one scoring forward.
        model ([`PreTrainedModel`]): the LLM you call `generate` on. Its hidden size must equal the agent's
            `state_dim`.
        top_k, top_p, strategy, decision, threshold, fallback_index (*optional*): override the agent config's
            decoding defaults (see [`MaraConfig`]).
        seed (`int`, *optional*, defaults to 0): with `decision="sample"`, the seed of the accept/reject draws,
            re-applied at every generate call so that a call is reproducible. `None` draws from torch's global RNG.
        chunk_size (`int`, `"auto"` or `None`, *optional*, defaults to `"auto"`): with strategy `"first"` (and
            `"veto"` under `greedy_generate`), score candidates in chunks of this many in probability order and stop
            once every row has an accept (the paper's serial early stop, batched). `"auto"`: at batch 1, a first chunk
            fitted to the agent's decisions so far in this call (the width with the least expected scoring cost:
            1 for an agent that accepts its top candidate, more for one that rejects often), doubling after a miss;
            1, 2, 4, ... candidates for larger batches, the later chunks for the rows still without an accept only
            (see `mara_hf.candidates.ChunkFit`). `None` scores the whole candidate set in one forward. The tokens
            are the same either way.
        trace (`bool`, *optional*, defaults to `False`): record, for every decision, the candidates, their
            P(accept) and the choice in `mara.stats.trace`.
        lookahead (`bool`, *optional*, defaults to `True`): score the next step's likely first candidates inside
            generate's own forward (see the module docstring). Same tokens either way; off costs a forward a step.
        greedy_generate (`bool`, *optional*, defaults to `False`): promise that `generate` decodes greedily
            (`do_sample=False`, `num_beams=1`). With strategy `"veto"`, greedy decoding emits the most probable
            accepted candidate, so the processor then judges candidates in probability order only up to that one
            (as strategy `"first"` does) and leaves only it possible: the same tokens as without the promise, with
            far fewer candidates scored (about 1 instead of the whole set per decision for an agent that mostly
            accepts). Under sampling or beams the promise makes `generate` emit that token too, so keep it off
            there. Other strategies are unaffected.

    After `generate`, `mara.stats` holds the decision statistics of that call.
    """

    def __init__(self, agent: MaraAgent, model=None, *, top_k: int | None = None, top_p: float | None = None,
                 strategy: str | None = None, decision: str | None = None, threshold: float | None = None,
                 fallback_index: int | None = None, seed: int | None = 0, chunk_size: "int | str | None" = "auto",
                 trace: bool = False, lookahead: bool = True, greedy_generate: bool = False):
        if model is None:
            raise ValueError("MaraProcessor needs the LLM it decodes with: MaraProcessor(agent, model=model).")
        agents = list(agent) if isinstance(agent, (list, tuple)) else [agent]
        for a in agents:
            if not isinstance(a, MaraAgent):
                raise TypeError(f"agent must be a MaraAgent or a list of them, got {type(a).__name__}.")
        if not agents:
            raise ValueError("MaraProcessor needs an agent (or a list of veto agents).")
        cfg = agents[0].config
        if len(agents) > 1:
            top_k, top_p = _common(agents, "top_k", top_k), _common(agents, "top_p", top_p)
            strategies = {strategy or a.config.strategy for a in agents}
            if strategies != {"veto"}:
                raise ValueError(f"Agents combine in one processor only with strategy 'veto' (each removes the "
                                 f"candidates it rejects); these decode with {sorted(strategies)}. Decode with one "
                                 "agent per call, or pass strategy='veto'.")
        self.top_k = cfg.top_k if top_k is None else top_k
        self.top_p = cfg.top_p if top_p is None else top_p
        self.strategy = cfg.strategy if strategy is None else strategy
        self.decision = getattr(cfg, "decision", "greedy") if decision is None else decision
        self.seed = seed
        self.threshold = cfg.threshold if threshold is None else threshold
        self.fallback_index = cfg.fallback_index if fallback_index is None else fallback_index
        check_decoding_settings(self.top_k, self.top_p, self.strategy, self.threshold, self.fallback_index,
                                self.decision)
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.greedy_generate = bool(greedy_generate)
        # "first" needs candidates only up to the first accept; so does "veto" when generate is greedy
        self._lazy = self.strategy == "first" or (self.strategy == "veto" and self.greedy_generate)
        hidden = getattr(model.config.get_text_config(), "hidden_size", None)
        for a in agents:
            if hidden != a.config.state_dim:
                raise ValueError(f"The agent reads states of width {a.config.state_dim} but the model's hidden_size "
                                 f"is {hidden}: use an agent trained for a model of this width.")
            base = a.config.base_model_name_or_path
            if base and getattr(model, "name_or_path", None) and base.rstrip("/") != str(model.name_or_path).rstrip("/"):
                logger.warning(f"This agent was trained for {base!r}, not {model.name_or_path!r}; agents work across "
                               "models of equal width, but expect different results.")
        self.agents = [a.to(model.device).eval() for a in agents]
        if len(agents) > 1:  # one judge that accepts what every agent accepts, each at its own threshold
            thresholds = [a.config.threshold if threshold is None else threshold for a in agents]
            agent = AllAccept(self.agents, thresholds, sampled=self.decision == "sample")
            self.threshold = 0.5
        else:
            agent = self.agents[0]
        self.agent = agent.to(model.device).eval()
        self.model = model
        self.trace = trace
        self.reset_stats()
        self._seen: dict = {}
        self._busy = False
        self._last_len = None
        self._new_call = False  # set by the hook at a prefill; the stats reset when this processor is next called
        self._warned_slow = False
        self.lookahead = lookahead and not transforms_logits(model)
        layout = layer_layout(model)
        if layout is not None and len(set(layout[1])) > 1:
            accepts_mask_dict(model)  # probe now, with a forward of its own, not in the middle of generate's
        self._spec = None  # the lookahead planned for generate's next forward
        self._ahead = None  # what that forward computed: speculated ids and their states
        self._kept = None  # the first speculated candidate's cache entry, for a deferred next step (`_capture`)
        self._token = object()  # who called last, for `_check_alone`
        ref = weakref.ref(self)
        self._hooks = [
            model.register_forward_pre_hook(lambda m, a, kw: _capture(ref, a, kw), with_kwargs=True),
            model.base_model.register_forward_hook(lambda m, a, out: _keep_states(ref, out)),
            model.register_forward_hook(lambda m, a, kw, out: _restore(ref, kw, out), with_kwargs=True),
        ]

    @classmethod
    def from_pretrained(cls, agent_name_or_path: "str | list[str]", model=None, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None, **overrides):
        """Load an agent from the Hub or a folder and wrap it: `MaraProcessor.from_pretrained(id, model=model)`; a
        list of ids combines veto agents (see the class docstring)."""
        if model is None:
            raise ValueError("Pass the LLM you generate with: MaraProcessor.from_pretrained(agent_id, model=model).")
        hub = {k: v for k, v in {"revision": revision, "token": token, "cache_dir": cache_dir}.items() if v is not None}
        names = agent_name_or_path if isinstance(agent_name_or_path, (list, tuple)) else [agent_name_or_path]
        agents = [MaraAgent.from_pretrained(name, **hub) for name in names]
        return cls(agents if isinstance(agent_name_or_path, (list, tuple)) else agents[0], model=model, **overrides)

    def remove(self):
        """Detach from the model (removes the forward hooks). The processor cannot be used afterwards."""
        for hook in self._hooks:
            hook.remove()

    def __del__(self):
        for hook in getattr(self, "_hooks", []):
            hook.remove()

    def custom_generate(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
                        synced_gpus: bool = False, streamer=None, **model_kwargs):
        """MARA's fast decoder as `model.generate`'s decoding loop:
        `model.generate(**inputs, custom_generate=mara.custom_generate, max_new_tokens=64)`.

        One sequence per prompt, greedy or sampled (`do_sample=True` with generate's temperature, top-k, top-p,
        ...); generate's stopping criteria (max/min new tokens, EOS, stop strings) and other logits processors
        apply, and `return_dict_in_generate` returns the sequences with `scores` / `logits` when asked. Greedy
        "veto" scores candidates only up to the emitted one (the loop knows it is greedy: no `greedy_generate`
        promise needed). Same tokens as `logits_processor=[mara]` with the same settings and seed, usually faster.
        Beams and attentions / hidden states raise an error: use `logits_processor=[mara]` for those.
        """
        from .loop import custom_generate

        return custom_generate(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def reset_stats(self):
        """Start a new run: fresh statistics and, for sampled decisions, the seeded draws from the start."""
        self.stats = MaraStats(self.top_k)
        self._step = 0  # decoding step of the current run (the trace's "step"), advanced by `choose`
        self._draws = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self._fit = ChunkFit(self.chunk_size)  # this call's chunk schedule, fitted to the agent as it decides

    def decision_bar(self, cands) -> "float | torch.Tensor":
        """What P(accept) must exceed: the threshold (greedy decisions) or one uniform draw per candidate slot
        `(batch, K)` (sampled decisions: accepted with probability P(accept)). Draws come from a CPU generator,
        so the same seed gives the same decisions on every device."""
        if self.decision == "greedy":
            return self.threshold
        return torch.rand(cands.ids.shape, generator=self._draws).to(cands.ids.device)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        self._check_alone(input_ids)
        if self._new_call or (self._last_len is not None and length != self._last_len + 1):
            # a new generate call: seen by the hook at its prefill, or by the length jump when uncached
            self.reset_stats()
            self._new_call = False
        self._last_len = length
        ahead, self._ahead, self._spec = self._ahead, None, None
        cands = candidate_set(scores, self.top_k, self.top_p)
        decided = cands.counts > 1
        bar = self.decision_bar(cands)
        p_accept, states = self._score(input_ids, cands, decided, ahead, bar)
        index, allowed = self.choose(cands, decided, p_accept, bar)
        if self.lookahead and states is not None:
            self._plan(input_ids, cands, index, states)
        return keep_allowed(scores, cands, allowed)

    def _check_alone(self, input_ids):
        """Refuse a second MaraProcessor on the same model in the same generate step (`logits_processor=[a, b]`):
        each steers generate's forward for its own candidates, so together they would decode wrongly."""
        last = getattr(self.model, "_mara_last_call", None)
        if last is not None and last[0] is not self._token and last[1]() is input_ids:
            raise ValueError("Two MaraProcessors in one generate call (logits_processor=[a, b]) are not supported: "
                             "each steers the model's forward for its own candidates. Combine veto agents in one "
                             "processor instead: MaraProcessor([agent_a, agent_b], model=model) keeps the candidates "
                             "every agent accepts.")
        self.model._mara_last_call = (self._token, weakref.ref(input_ids))

    def _prefix(self, input_ids):
        """generate's cache, padding mask and next positions for this step, or a fresh cache when not shareable."""
        batch, length = input_ids.shape
        seen = self._seen
        mask = seen.get("attention_mask")
        if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
            raise ValueError("MaraProcessor could not recover the padding mask from generate's prepared attention "
                             "mask: with a static cache, let generate make the position ids (real tokens counted from "
                             "0), or use the default cache.")
        if mask is not None and mask.shape != (batch, length):
            if mask.shape[0] == batch and bool(mask.all()):
                mask = None
            else:
                raise ValueError("MaraProcessor cannot follow this generation mode (input_ids grew by more than one "
                                 "token per step, e.g. assisted decoding); use plain greedy, sampling or beam search.")
        if mask is not None and bool(mask.all()):
            mask = None
        cache = seen["cache"]() if seen.get("cache") is not None else None
        if _cache_matches(cache, batch, length) and room(cache) >= 1:
            positions = next_positions(length, mask, seen.get("position_ids"), batch, input_ids.device)
            return cache, mask, positions
        if layer_layout(self.model) is None:
            raise MasksUnsupported("layer types other than full and sliding-window attention")
        if _cache_matches(cache, batch, length):  # a static cache filled to max_cache_len: generate's last step
            logger.info("MaraProcessor: generate's static cache is full, re-encoding the prefix for this step.")
        else:
            self._warn_slow("MaraProcessor re-encodes the prefix at every step because generate's KV cache cannot be "
                            f"shared (use_cache=False or an unsupported cache type: {type(cache).__name__}): this is "
                            "slow.")
        # Full-attention storage: sliding windows are applied by the masks, so nothing falls out of the cache.
        cache = DynamicCache()
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else None
        base = self.model.base_model
        base(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg(base): cache})
        return cache, mask, next_positions(length, mask, None, batch, input_ids.device)

    def _score(self, input_ids, cands, decided, ahead, bar):
        """P(accept) `(batch, K)` of the candidates, and the states of slots 0..n-1 `(batch, n, hidden)` (None when
        nothing was scored). The lookahead's states cover the leading slots whose ids match in every row; the
        rest is scored on generate's cache, only when some row still needs it."""
        width = cands.ids.shape[1]
        p_accept = torch.zeros(cands.ids.shape, dtype=torch.float32, device=cands.ids.device)
        states, start = None, 0
        if ahead is not None and ahead["ids"].shape[0] == cands.ids.shape[0]:
            n = min(width, ahead["ids"].shape[1])
            same = (ahead["ids"][:, :n] == cands.ids[:, :n]) & ahead["valid"][:, :n]
            start = int(same.int().cumprod(-1).sum(-1).min())
            if start > 0:
                states = ahead["states"][:, :start]
                p = self.agent(states).accept_prob.float()
                p_accept[:, :start] = p.masked_fill(torch.isnan(states).any(-1) | torch.isnan(p), 0.0)
        if not bool(decided.any()) or start >= width:
            return p_accept, states
        if self._lazy and start > 0 and bool(decided_all(p_accept, cands, decided, bar, start)):
            return p_accept, states  # the other strategies need every candidate judged; lazy ones may stop here
        self._busy = True
        try:
            chunk, grow = self._chunks(input_ids.shape[0]) if self._lazy else (None, False)
            try:
                cache, mask, positions = self._prefix(input_ids)
                # a static cache has room for this many more entries: score at most that many at a time
                if room(cache) < width:
                    chunk, grow = min(chunk or width, room(cache)), False
                p_accept, more = judge_candidates(self.model.base_model, self.agent, cache, cands, decided, mask,
                                                  positions, bar, chunk, stats=self.stats, p_accept=p_accept, grow=grow,
                                                  start=start, stop_early=self._lazy)
            except MasksUnsupported as why:
                self._warn_slow(f"MaraProcessor cannot score candidates on a shared KV cache for this model ({why}): "
                                "it re-encodes the prefix and scores each candidate as its own row; exact but slow.")
                mask = self._seen.get("attention_mask")
                mask = None if mask is None or bool(mask.all()) else mask
                more = score_rows(self.model.base_model, input_ids, mask, cands.ids[:, start:])
                p = self.agent(more).accept_prob.float()
                p_accept[:, start:] = p.masked_fill(torch.isnan(more).any(-1) | torch.isnan(p), 0.0)
                self.stats.scored += more.shape[0] * more.shape[1]
                self.stats.forwards += 1
        finally:
            self._busy = False
        return p_accept, more if states is None else torch.cat([states, more], dim=1)

    def _chunks(self, batch: int) -> tuple[int | None, bool]:
        """(first chunk, doubling) for this step (see `mara_hf.candidates.ChunkFit`)."""
        return self._fit(batch, self.stats)

    def _warn_slow(self, message):
        if not self._warned_slow:
            logger.warning(message)
            self._warned_slow = True

    def _plan(self, input_ids, cands, index, states):
        """From the chosen candidates' states, the next step's likely first candidates, for generate's next
        forward to score on the way."""
        rows = torch.arange(index.shape[0], device=index.device)
        known = index < states.shape[1]
        hidden = states[rows, index.clamp(max=states.shape[1] - 1)]
        logits = self.model.get_output_embeddings()(hidden)
        nxt = candidate_set(logits.float(), self.top_k, self.top_p)
        first = self._chunks(index.shape[0])[0]
        width = nxt.ids.shape[1] if (first is None or not self._lazy) else first
        self._spec = {"ids": nxt.ids[:, :width],
                      "valid": nxt.mask[:, :width] & known[:, None], "length": input_ids.shape[1],
                      "cache": self._seen.get("cache")}
        if bool(known.all()) and hidden.dtype in (torch.float32, torch.float64):
            # These are the logits generate's next forward computes for the chosen tokens: offer them, so that
            # forward can skip its LM head (see `_capture`, `_restore`). Half precision: the tree forward's
            # states differ from generate's by rounding that may move a token, so generate computes its own.
            self._spec.update(token=cands.ids[rows, index], state=hidden, logits=logits)

    def choose(self, cands, decided, p_accept, bar=None):
        """Index of the emitted candidate per row, and which candidates stay possible, per the strategy.

        `bar` is what P(accept) had to exceed (`decision_bar`); default: the threshold. For "filter" and "veto" the
        index is the most probable allowed candidate (what greedy decoding emits)."""
        bar = self.threshold if bar is None else bar
        accepted = (p_accept > bar) & cands.mask & decided[:, None]
        any_accept = accepted.any(-1)
        first = torch.where(any_accept, accepted.int().argmax(-1), -1)
        fallback = cands.counts - 1 if self.fallback_index < 0 else cands.counts.clamp(max=self.fallback_index + 1) - 1
        if self.strategy == "max_prob":
            best = p_accept.masked_fill(~accepted, -1.0).argmax(-1)
            index = torch.where(any_accept, best, fallback)
        else:
            index = torch.where(any_accept, first, fallback)
        index = torch.where(decided, index, 0)
        slots = torch.arange(cands.ids.shape[1], device=index.device)
        allowed = slots[None] == index[:, None]
        if self.strategy == "filter":
            allowed = torch.where(any_accept[:, None], accepted, allowed)
        elif self.strategy == "veto":  # every candidate rejected: no veto, the LLM chooses among all of them
            index = torch.where(decided & ~any_accept, 0, index)
            if not self.greedy_generate:  # greedy: the index is what generate emits, and all that was judged
                allowed = torch.where(any_accept[:, None], accepted, cands.mask)
        self.stats.add(decided, cands.counts, first, any_accept)
        if self.trace:
            self._record(cands, decided, p_accept, index, any_accept)
        self._step += 1
        return index, allowed

    def _record(self, cands, decided, p_accept, index, any_accept):
        for row in decided.nonzero().flatten().tolist():
            n = int(cands.counts[row])
            self.stats.trace.append({
                "row": row, "step": self._step, "candidates": cands.ids[row, :n].tolist(),
                "logprobs": cands.logprobs[row, :n].tolist(), "p_accept": p_accept[row, :n].tolist(),
                "index": int(index[row]), "token": int(cands.ids[row, index[row]]), "fallback": not bool(any_accept[row]),
            })


def _common(agents, name, override):
    """The setting `name` the agents share (or the override): combined agents judge one candidate set."""
    if override is not None:
        return override
    values = {getattr(a.config, name) for a in agents}
    if len(values) > 1:
        raise ValueError(f"The agents decode with different {name} ({sorted(values)}): they judge one candidate set "
                         f"together, so pass {name}=... to MaraProcessor.")
    return values.pop()


class AllAccept(torch.nn.Module):
    """Several veto agents as one judge: a candidate is accepted when every agent accepts it, each at its own
    threshold (greedy decisions: P(accept) is 1 or 0, against the bar 0.5), or with the product of their P(accept)
    (sampled decisions: as if each drew its own decision independently)."""

    def __init__(self, agents, thresholds, sampled: bool):
        super().__init__()
        self.agents = torch.nn.ModuleList(agents)
        self.thresholds = list(thresholds)
        self.sampled = sampled

    def forward(self, states):
        from ..agent.modeling import MaraAgentOutput

        probs = [a(states).accept_prob.float() for a in self.agents]
        if self.sampled:
            p = torch.stack(probs).prod(0)
        else:
            p = torch.stack([q > t for q, t in zip(probs, self.thresholds)]).all(0).float()
        return MaraAgentOutput(accept_prob=p)


def keep_allowed(scores: torch.Tensor, cands, allowed: torch.BoolTensor) -> torch.Tensor:
    """`scores` with every token but the allowed candidates set to -inf (what generate then decodes from)."""
    values = torch.where(allowed, scores.gather(1, cands.ids), float("-inf"))
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_reduce_(1, cands.ids, values, reduce="amax", include_self=True)


def _capture(ref, args, kwargs):
    """Forward pre-hook on the LLM: remember generate's cache, mask and positions for the coming scores, and
    add the planned lookahead candidates to generate's decode step."""
    self = ref()
    if self is None or self._busy:
        return None
    cache = cache_from_kwargs(kwargs)
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
        # prefill: a new generate call, maybe one this processor takes no part in (plain generate, another
        # processor, serial_generate): reset lazily, at this processor's next call, so its stats survive those.
        self._new_call = True
        self._spec = None
        self._kept = None
    # Weak references: after generate returns, its KV cache must not be kept alive by the processor.
    self._seen = {"cache": weakref.ref(cache) if cache is not None else None,
                  "attention_mask": _padding_mask(self, kwargs, cache), "position_ids": kwargs.get("position_ids")}
    spec, self._spec = self._spec, None
    ids = kwargs.get("input_ids")
    if (spec is None or args or ids is None or ids.shape != (spec["ids"].shape[0], 1) or spec["cache"] is None
            or cache is not spec["cache"]() or cache.get_seq_length() != spec["length"] or kwargs.get("output_hidden_states")
            or kwargs.get("output_attentions") or kwargs.get("inputs_embeds") is not None):
        return None
    batch, width = spec["ids"].shape
    length = spec["length"]  # tokens in the cache; generate's new token goes at index `length`
    mask2d = self._seen["attention_mask"]
    if mask2d is not None:
        if mask2d.dim() != 2 or mask2d.shape[1] != length + 1:
            return None  # a mask this processor does not understand: leave generate's step alone
        mask2d = None if bool(mask2d.all()) else mask2d
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = next_positions(length, None if mask2d is None else mask2d[:, :-1], None, batch, ids.device)[:, None]
    if not shareable(cache) or not Scratch.can_keep_some(cache) or room(cache) < 1 + width:
        return None
    dtype = next(self.model.parameters()).dtype
    reuse = "logits" in spec and "logits_to_keep" in kwargs and bool((ids[:, 0] == spec["token"]).all())
    # Deferred: generate's token is the candidate the last forward speculated and scored, whose cache entry was put
    # aside (`_restore`): put it back and run only the new candidates. One query less per forward, which on a CPU at
    # batch 1 is most of the lookahead's cost (a forward of 2 tokens costs about 1.4 of 1 token's).
    kept = self._kept if reuse else None
    deferred = (kept is not None and kept["cache"]() is cache and kept["length"] == length
                and bool((ids[:, 0] == kept["token"]).all()))
    self._kept = None
    try:
        if deferred:
            for i, (k, v) in enumerate(kept["kv"]):
                cache.update(k, v, i)
            mask = tree_masks(self.model.base_model, cache, mask2d, range(length + 1, length + 1 + width),
                              [length + 1] * width, [length + 1] * width, dtype, ids.device)
        else:
            # Query 0 is generate's token: it sees the (unpadded) prefix and itself. The candidates see the same
            # plus themselves, all at the next position: the tree mask with generate's token counted as prefix.
            mask = tree_masks(self.model.base_model, cache, mask2d, range(length, length + 1 + width),
                              [length] + [length + 1] * width, [length] + [length + 1] * width, dtype, ids.device)
    except MasksUnsupported:
        return None
    ahead_pos = (pos[:, -1:] + 1).expand(batch, width)
    if deferred:
        kwargs = dict(kwargs, input_ids=spec["ids"], position_ids=ahead_pos, attention_mask=mask)
    else:
        kwargs = dict(kwargs, input_ids=torch.cat([ids, spec["ids"]], dim=1),
                      position_ids=torch.cat([pos, ahead_pos], dim=1), attention_mask=mask)
    if "logits_to_keep" in kwargs:  # only generate's token needs logits, none when the planned ones can serve
        kwargs["logits_to_keep"] = torch.tensor([] if reuse else [0], dtype=torch.long, device=ids.device)
    # The states computed are true states of whatever prefix and token the rows hold now (beams may have
    # reordered them); `_score` uses them only for candidates whose ids match the real candidate set.
    self._ahead = {"ids": spec["ids"], "valid": spec["valid"], "states": None, "width": width,
                   "scratch": Scratch(cache).begin(), "reuse": spec if reuse else None, "deferred": deferred,
                   # greedy, one sequence per row (the promise): the first candidate's entry may serve next step
                   "keep": self.greedy_generate and all(type(layer) is DynamicLayer for layer in cache.layers),
                   "cache": weakref.ref(cache), "length": length + 1}
    self.stats.scored += batch * width
    return args, kwargs


def _padding_mask(self, kwargs, cache):
    """generate's 2D padding mask for this forward. With a static cache generate passes a prepared 4D mask (or one
    per layer type) instead; then the padding is the prompt's, recorded at the prefill (from its 2D mask, or, when
    that is prepared too, from its position ids: generate gives left padding position 0, like the first real
    token; no mask at all means no padding), followed by ones."""
    mask = kwargs.get("attention_mask")
    pos, ids = kwargs.get("position_ids"), kwargs.get("input_ids")
    length = seq_length(cache) if cache is not None and hasattr(cache, "get_seq_length") else None
    if length == 0 and ids is not None:  # a prefill: a new generate call
        if mask is None:
            self._prompt_mask = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        elif torch.is_tensor(mask) and mask.dim() == 2:
            self._prompt_mask = mask
        elif pos is not None and pos.dim() == 2:
            # the last 0 of a row is its first real token: everything before it is left padding
            index = torch.arange(pos.shape[1], device=pos.device)
            first = torch.where(pos == 0, index, -1).amax(-1, keepdim=True)
            real = (index >= first).long()
            self._prompt_mask = real if bool((pos == (real.cumsum(-1) - 1).clamp(min=0)).all()) else None
        else:
            self._prompt_mask = None
    if mask is None or (torch.is_tensor(mask) and mask.dim() == 2):
        return mask
    prompt = getattr(self, "_prompt_mask", None)
    if prompt is None or ids is None or length is None or prompt.shape[0] != ids.shape[0]:
        return mask  # not understood: `_prefix` refuses it clearly, `_capture` leaves generate's step alone
    total = length + ids.shape[1]
    return torch.cat([prompt, prompt.new_ones(prompt.shape[0], max(total - prompt.shape[1], 0))], dim=1)[:, :total]


def _keep_states(ref, out):
    """Forward hook on the base model: keep the lookahead candidates' last hidden states."""
    self = ref()
    if self is not None and not self._busy and self._ahead is not None and self._ahead["states"] is None:
        if self._ahead["deferred"]:  # generate's token was not in this forward: every query is a candidate
            self._ahead["states"] = out.last_hidden_state
        else:
            self._ahead["states"] = out.last_hidden_state[:, 1:]
            self._ahead["token_state"] = out.last_hidden_state[:, 0]


def _restore(ref, kwargs, out):
    """Forward hook on the LLM: make generate's step look plain again (cache cropped, one position of logits)."""
    self = ref()
    if self is None or self._busy or self._ahead is None or self._ahead.get("restored"):
        return None
    ahead = self._ahead
    cache = ahead["cache"]()
    if ahead["keep"] and cache is not None:  # put the first candidate's entry aside for a deferred next step
        at = ahead["length"]
        self._kept = {"kv": [(layer.keys[:, :, at:at + 1].clone(), layer.values[:, :, at:at + 1].clone())
                             for layer in cache.layers],
                      "token": ahead["ids"][:, 0], "cache": ahead["cache"], "length": at}
    ahead["scratch"].end(ahead["width"])
    ahead["restored"] = True
    if ahead["reuse"] is not None and ahead["deferred"]:  # the planned logits are those of the entry put back
        out.logits = ahead["reuse"]["logits"][:, None]
    elif ahead["reuse"] is not None:  # the LM head was skipped: the planned logits, if they are this state's
        planned, state = ahead["reuse"], ahead["token_state"]
        # Same prefix and token give the same state up to float32 rounding; anything else (rows reordered by beam
        # search, another token) differs grossly and gets generate's own logits.
        same = (state - planned["state"]).abs().amax() <= 1e-4 * state.abs().amax()
        out.logits = (planned["logits"] if bool(same) else self.model.get_output_embeddings()(state))[:, None]
    elif out.logits is not None and out.logits.shape[1] > 1:
        out.logits = out.logits[:, :1]
    return out


def _cache_matches(cache, batch: int, length: int) -> bool:
    """True when `cache` is a cache this processor can share (see `caches`) holding exactly this batch's prefix."""
    if cache is None or not shareable(cache):
        return False
    try:
        return seq_length(cache) == length and cache.layers[0].keys.shape[0] == batch
    except (AttributeError, IndexError, TypeError):
        return False

