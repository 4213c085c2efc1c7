"""`MaraProcessor`: MARA decoding as a `LogitsProcessor`, so `model.generate(..., logits_processor=[mara])` aligns.

At every step the processor builds the candidate set from the scores it receives, computes the states of the
candidates of every row in one batched forward on `generate`'s own KV cache (recorded by its hooks, see
`decoding.lookahead`), asks the agent, applies the decision rule (`decoding.rule`) and leaves only the allowed
candidates possible. Under sampling a veto agent's candidates are drawn, then judged: put in an order drawn from
the LLM's warped distribution q and judged only until one is accepted, which is emitted (a draw of q restricted to
the accepted candidates q can draw; `decoding.sampling` defines the distribution, also when there are none). Each
generate call is served on its own: the call is read from generate's frames (`decoding.callers`) at its first
step. Lookahead scores the next step's likely candidates inside generate's own forward, so most steps need no
forward of their own. `mara_hf.generate` and `custom_generate` run the same agent and rule in MARA's
fast loop instead (`decoding.generate`).
"""

import threading
import weakref

import torch
from transformers import LogitsProcessor
from transformers.utils import logging

from ..agent.configuration import check_decoding_settings
from ..agent.modeling import MaraAgent
from ..utils import token_ids
from .call_checks import check_alone, check_one_call_at_a_time, check_one_forward_per_step
from .callers import GenerateCall, serving_list
from .caches import accepts_mask_dict, layer_layout
from .candidates import candidate_set, transforms_logits
from .chunks import ChunkFit, check_chunk_size
from .combined import AllAccept, common_setting
from .generate import custom_generate
from .lookahead import GenerateHooks
from .loop import decode
from .rule import Decision, DecisionRule, keep_allowed
from .sampling import NOT_DRAWN, Draws, draws_possible, drawn_rule
from .stats import MaraStats
from .step_scoring import score_step

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
            `"veto"` in a greedy call), score candidates in chunks of this many in probability order and stop
            once every row has an accept (the paper's serial early stop, batched). `"auto"`: at batch 1, a first chunk
            fitted to the agent's decisions so far in this call (the width with the least expected scoring cost:
            1 for an agent that accepts its top candidate, more for one that rejects often), doubling after a miss;
            1, 2, 4, ... candidates for larger batches, the later chunks for the rows still without an accept only
            (see `mara_hf.decoding.chunks.ChunkFit`). `None` scores the whole candidate set in one forward. The tokens
            are the same either way.
        trace (`bool`, *optional*, defaults to `False`): record, for every decision, the candidates, their
            P(accept) and the choice in `mara.stats.trace`.
        lookahead (`bool`, *optional*, defaults to `True`): score the next step's likely first candidates inside
            generate's own forward (see the module docstring). Same tokens either way; off costs a forward a step.
        greedy_generate (`bool`, *optional*): how `generate` decodes. By default (`None`) the processor reads it
            from each `generate` call it serves (the generation config of transformers' decoding loop, once per
            call): in a greedy call (`do_sample=False`, `num_beams=1`, MARA the last logits processor) a `"veto"`
            agent's candidates are judged in probability order only up to the first accepted one, which is the one
            greedy decoding emits, and only it is left possible: the same tokens as judging every candidate, with
            far fewer scored (about 1 instead of the whole set per decision for an agent that mostly accepts).
            Under sampling a veto agent's candidates are drawn, then judged: judged in an order drawn from the
            warped distribution q until the first accepted one, which is emitted: a draw of q restricted to the
            accepted candidates q can draw (`mara_hf.decoding.sampling` defines the distribution); under beam
            search every candidate is judged.
            Where it cannot tell (the processor called outside `generate`), it judges every candidate and says so
            once in the log. `True` promises greedy decoding (a call that samples or searches beams then raises);
            `False` always judges every candidate (same tokens). Other strategies are unaffected.

    After `generate`, `mara.stats` holds the decision statistics of that call. A processor serves one `generate`
    call at a time, on the model it was built for: for calls in several threads, build one per thread (they may
    share the agent and the model).
    """

    def __init__(self, agent: MaraAgent, model=None, *, top_k: int | None = None, top_p: float | None = None,
                 strategy: str | None = None, decision: str | None = None, threshold: float | None = None,
                 fallback_index: int | None = None, seed: int | None = 0, chunk_size: "int | str | None" = "auto",
                 trace: bool = False, lookahead: bool = True, greedy_generate: bool | None = None):
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
            top_k, top_p = common_setting(agents, "top_k", top_k), common_setting(agents, "top_p", top_p)
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
        if greedy_generate not in (None, True, False):
            raise ValueError(f"greedy_generate must be None (read from each generate call), True or False, got "
                             f"{greedy_generate!r}.")
        self.greedy_generate = greedy_generate
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
        # greedy generate emits the most probable allowed candidate: with "veto" only that one need stay allowed.
        # `rule` is the one of the generate call being served (`_begin_call`); fast loops use `_rules[promise]`.
        self._rules = {top: DecisionRule(self.strategy, self.threshold, self.fallback_index, emits_top=top)
                       for top in (False, True)}
        self.rule = self._rules[self.greedy_generate is True]
        self.mode = None  # how the generate call being served decodes: "greedy", "sample", "beams" or None
        self._draws_here = None  # a sampled call's draws (`sampling.Draws`), when its candidates are drawn
        self.lookahead = lookahead and not transforms_logits(model)
        self.reset_stats()
        self._last_len = None
        self._call = None  # weak reference to the LogitsProcessorList of the generate call being served
        self._thread = None  # the thread of that call
        self._fast_lock = threading.Lock()  # the fast loop serves one call at a time
        self._forwards_at_call = 0  # the hooks' forward count at this processor's last call
        self._warned_slow = False
        self._warned_mode = False
        self._removed = False
        layout = layer_layout(model)
        if layout is not None and len(set(layout[1])) > 1:
            accepts_mask_dict(model)  # probe now, with a forward of its own, not in the middle of generate's
        self._hooks = GenerateHooks(model, keep_first=self.greedy_generate is True)
        self._hooks.attach()

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

    # ----- attachment -------------------------------------------------------------------------------------------
    def remove(self):
        """Detach from the model: its forward hooks are removed and the processor cannot be used afterwards."""
        self._hooks.detach()
        self._removed = True

    def __enter__(self) -> "MaraProcessor":
        """`with MaraProcessor(agent, model=model) as mara:` detaches the processor from the model at the end of the
        block, also when it raises."""
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        agents = ", ".join(str(a.config.name_or_path or type(a).__name__) for a in self.agents)
        return (f"MaraProcessor(agent={agents}, strategy={self.strategy!r}, decision={self.decision!r}, "
                f"threshold={self.threshold}, top_k={self.top_k}, top_p={self.top_p}, chunk_size={self.chunk_size!r}"
                f"{', removed' if self._removed else ''})")

    # ----- decoding ---------------------------------------------------------------------------------------------
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
        return custom_generate(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def fast_decode(self, model, input_ids, attention_mask, *, lazy: bool, rule=None,
                    chunk_size: "int | str | None | bool" = True, **loop) -> torch.LongTensor:
        """MARA's fast loop (`decoding.loop.decode`) with this processor's agent, bars and decision rule; `stats`
        describe the call afterwards. `lazy`: candidates may be judged in chunks that stop at the emitted one;
        `rule`: a callable applying `decide` (default: `decide` itself); `chunk_size`: default this processor's."""
        self._check_usable()
        if self.model is not model:
            raise ValueError("The processor was built for another model: MaraProcessor(agent, model=model).")
        if not self._fast_lock.acquire(blocking=False):
            raise RuntimeError("This MaraProcessor is decoding in another thread: build one MaraProcessor per thread "
                               "(they may share the agent and the model).")
        try:
            return self._fast_decode(model, input_ids, attention_mask, lazy, rule, chunk_size, loop)
        finally:
            self._fast_lock.release()

    def _fast_decode(self, model, input_ids, attention_mask, lazy, rule, chunk_size, loop):
        chunk_size = self.chunk_size if chunk_size is True else chunk_size
        self.rule = self._rules[self.greedy_generate is True]  # the loop applies its own rule; the promise's, if any
        self.reset_stats()
        if chunk_size == self.chunk_size and lazy:
            loop["chunks"] = self._fit  # this call's schedule, fitted from its `stats`
        with self._hooks.paused():  # the loop's forwards are not generate's
            out = decode(model, self.agent, input_ids, attention_mask, top_k=self.top_k, top_p=self.top_p,
                         chunk_size=chunk_size if lazy else None, threshold=self.decision_bar,
                         rule=rule or self.decide, stats=self.stats, unscored=self._unscored, **loop)
        if self.trace:  # what was emitted (a sampling loop may draw among the allowed) and where rows end
            self.stats.tokens = list(out[:, input_ids.shape[1]:].unbind(1))
            self.stats.mode = "fast"
            self.stats.ends = token_ids(loop.get("eos"))
        return out

    @property
    def _unscored(self) -> float:
        """P(accept) given to candidates left unjudged: NaN when tracing, so the trace can say so (None)."""
        return float("nan") if self.trace else 0.0

    def reset_stats(self):
        """Start a new run: fresh statistics and, for sampled decisions, the seeded draws from the start."""
        self.stats = MaraStats(self.top_k, traced=self.trace)
        self._step = 0  # decoding step of the current run (the trace's "step"), advanced by `decide`
        self._draws = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self._fit = ChunkFit(self.chunk_size)  # this call's chunk schedule, fitted to the agent as it decides

    def decision_bar(self, cands) -> "float | torch.Tensor":
        """What P(accept) must exceed: the threshold (greedy decisions) or one uniform draw per candidate slot
        `(batch, K)` (sampled decisions: accepted with probability P(accept)). Draws come from a CPU generator,
        so the same seed gives the same decisions on every device."""
        if self.decision == "greedy":
            return self.threshold
        return torch.rand(cands.ids.shape, generator=self._draws).to(cands.ids.device)

    def decide(self, cands, decided, p_accept, bar=None, rule=None) -> Decision:
        """The decision rule (`rule`, default this call's) applied to one step, recorded in `stats` (and
        `stats.trace` with `trace=True`, where candidates left unjudged have P(accept) NaN: recorded as None)."""
        judged = None
        if self.trace:
            judged = ~torch.isnan(p_accept)
            p_accept = p_accept.nan_to_num(0.0)
        decision = (rule or self.rule)(cands, decided, p_accept, bar)
        self.stats.add(decided, cands.counts, decision.first, decision.any_accept)
        if self.trace:
            self.stats.record(self._step, cands, decided, p_accept, judged, self.threshold if bar is None else bar,
                              decision)
        self._step += 1
        return decision

    def warn_slow(self, message: str, always: bool = False):
        """Log that decoding takes a slow path: once per processor (every time with `always`)."""
        if always or not self._warned_slow:
            logger.warning(message)
        self._warned_slow = True

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check_usable()
        batch, length = input_ids.shape
        serving = serving_list()
        check_one_call_at_a_time(self, serving)
        check_alone(self, input_ids)
        check_one_forward_per_step(self)
        hooks = self._hooks
        if (hooks.new_call or self._last_len is None or length != self._last_len + 1
                or (serving is not None and (self._call is None or self._call() is not serving))):
            # a new generate call: seen by the hooks at its prefill, by generate's new list of processors, or by the
            # length jump when uncached
            self._last_len = None  # until the call is accepted (`_begin_call` may refuse it)
            self.reset_stats()
            self._begin_call()
            hooks.new_call = False
            self._call = weakref.ref(serving) if serving is not None else None
            self._thread = threading.get_ident()
        self._last_len = length
        if self.trace and self._step > 0:  # the token generate emitted at the last step (it may draw among several)
            self.stats.tokens[-1] = input_ids[:, -1]
        ahead = hooks.take_ahead()
        cands = candidate_set(scores, self.top_k, self.top_p)
        if self._draws_here is not None:  # sampling: judge in an order drawn from generate's warped scores
            cands = self._draws_here.order(cands, input_ids, scores)
        decided = cands.counts > 1
        bar = self.decision_bar(cands)
        # greedy_generate=False judges every candidate, also where drawing would let it stop (same tokens)
        lazy = self.rule.lazy and not (self._draws_here is not None and self.greedy_generate is False)
        p_accept, states = score_step(self, input_ids, cands, decided, ahead, bar, lazy)
        decision = self.decide(cands, decided, p_accept, bar)
        order = None
        if self._draws_here is not None:  # the lookahead plans the candidates the next step draws first
            order = self._draws_here.planned_order(
                torch.cat([input_ids, cands.ids.gather(1, decision.index[:, None])], dim=1))
        if self.lookahead and states is not None:
            first = self._fit(batch, self.stats)[0]
            width = None if (first is None or not self.rule.lazy) else first
            hooks.plan(length, cands, decision.index, states, self.top_k, self.top_p, width, self.stats, order)
        return keep_allowed(scores, cands, decision.allowed)

    def _begin_call(self):
        """At the first step of a generate call: how it decodes (`mode`), and the rule and cache handling that
        follow. Greedy decoding emits the most probable allowed candidate, so a veto agent need judge candidates
        only up to its first accept (`DecisionRule.emits_top`); sampling draws, then judges (`sampling`)."""
        self._draws_here = None
        call = GenerateCall.find(self)
        if call.model is not None and call.model is not self.model:
            raise ValueError(f"This MaraProcessor was built for another model ({type(self.model).__name__} "
                             f"{self.model.name_or_path!r}) than generate runs ({type(call.model).__name__} "
                             f"{call.model.name_or_path!r}): build one with MaraProcessor(agent, model=model).")
        if self.greedy_generate is True and call.mode in ("sample", "beams"):
            raise ValueError(f"This MaraProcessor was built with greedy_generate=True, a promise of greedy decoding, "
                             f"but this call {'samples' if call.mode == 'sample' else 'searches beams'}: build it "
                             "without greedy_generate (it reads how each call decodes).")
        after = call.after
        if self.greedy_generate is True:
            greedy, self.mode = True, "greedy"
        else:
            self.mode = call.mode
            last = after is not None and len(after) == 0
            greedy = self.mode == "greedy" and last and self.greedy_generate is None
            if self.mode == "sample" and self.strategy == "veto" and after is not None:
                if draws_possible(after):
                    self._draws_here = Draws(after)  # drawn, then judged (`sampling`)
                else:
                    self._warn_mode(NOT_DRAWN)
            if self.greedy_generate is None:
                if self.mode is None and self.strategy == "veto":
                    self._warn_mode("MaraProcessor could not tell how this call decodes (no transformers generate "
                                    "loop among its callers): it judges every candidate, which is exact for any "
                                    "decoding but slower. Pass greedy_generate=True if you decode greedily.")
                elif self.mode == "greedy" and not last:
                    self._warn_mode("Another logits processor follows MaraProcessor in this greedy call: it may "
                                    "reorder the candidates MARA allows, so every candidate is judged (slower). Put "
                                    "MARA last.")
        self.rule = drawn_rule(self.threshold) if self._draws_here is not None else self._rules[bool(greedy)]
        if self.trace:  # how the call decodes and where its rows end (`stats.view`)
            self.stats.mode = self.mode
            self.stats.ends = token_ids(getattr(call.config, "eos_token_id", None))
        # generate emits the one candidate MARA decided (greedy, or a sampled veto's draw): the lookahead's first
        # candidate, when it is that one, need not be run again in generate's next forward
        self._hooks.keep_first = bool(greedy) or self._draws_here is not None

    def _warn_mode(self, message: str):
        """Say once per processor that a call judges every candidate, and why."""
        if not self._warned_mode:
            logger.warning(message)
        self._warned_mode = True

    # ----- checks -----------------------------------------------------------------------------------------------
    def _check_usable(self):
        if self._removed:
            raise RuntimeError("This MaraProcessor was removed from its model (remove() or the end of its `with` "
                               "block): build a new one.")

