"""The processor's hooks in `generate`'s forwards: what generate computed, and the lookahead that rides along.

A `LogitsProcessor` sees only `input_ids` and scores. To score candidates on generate's own KV cache, the processor
needs that cache, the padding mask and the positions of the step: a forward pre-hook on the LLM records them
(`GenerateHooks.seen`). Lookahead: the emitted candidate's state gives, through the LM head, the next step's
logits, hence its likely first candidates (`GenerateHooks.plan`). Those ride along in generate's next forward as
extra query positions with a tree mask; a forward hook on the base model keeps their states and one on the LLM
crops the cache back and keeps only the real token's logits, so generate sees a plain step and most steps need no
scoring forward of their own. The speculated states serve only candidates whose ids match the set built from the
real scores (`MaraProcessor._score`).

The hooks live while the processor is attached to its model: from its construction until `remove()`, the end of
a `with MaraProcessor(...)` block, or its garbage collection. They hold only a weak reference to their owner, keep
their state on this object (never on the model), and stand aside while `paused()` (the processor's own forwards).
"""

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging

from .caches import (MasksUnsupported, Scratch, cache_arg, cache_from_kwargs, layer_layout, room, seq_length, shareable,
                     tree_masks)
from .callers import in_prefill
from .candidates import candidate_set, next_positions

logger = logging.get_logger(__name__)


# Per model, the processor that scored the last step and that step's input_ids (weakly; cleared at every prefill,
# when a new generate call starts): a second processor called on the same input_ids is in the same call.
LAST_CALL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Plan:
    """The lookahead planned for generate's next forward: candidates `ids` `(batch, width)` (`valid` where real)
    after a cache of `length` tokens (`cache`, a weak reference). With `token`/`state`/`logits`, the logits that
    forward would compute for the emitted tokens, offered so it can skip its LM head."""

    ids: torch.LongTensor
    valid: torch.BoolTensor
    length: int
    cache: "weakref.ref | None"
    stats: object  # the processor's `MaraStats`: the ride-along candidates count as scored
    token: "torch.LongTensor | None" = None
    state: "torch.Tensor | None" = None
    logits: "torch.Tensor | None" = None


@dataclass
class Ahead:
    """What a forward with ride-along candidates is computing, and then computed (`states`)."""

    ids: torch.LongTensor
    valid: torch.BoolTensor
    width: int
    scratch: Scratch
    reuse: "Plan | None"  # the plan whose logits stand in for the skipped LM head
    deferred: bool  # generate's token was put back from `Kept`: every query is a candidate
    keep: bool  # put the first candidate's entry aside for a deferred next step
    cache: weakref.ref
    length: int
    states: "torch.Tensor | None" = None
    token_state: "torch.Tensor | None" = None
    restored: bool = False


@dataclass
class Kept:
    """The first speculated candidate's cache entry, put aside for the next step (deferred lookahead)."""

    kv: list = field(default_factory=list)
    token: "torch.LongTensor | None" = None
    cache: "weakref.ref | None" = None
    length: int = 0


class _CallState(threading.local):
    """The hooks' state of the generate call running in one thread: each thread has its own, so calls on one model
    in several threads (each with its own processor) do not see each other's forwards."""

    def __init__(self, keep_first: bool = False):
        self.keep_first = keep_first
        self.paused_now = False
        self.forwards = 0  # generate's forwards seen: a processor is called once after each
        self.seen: dict = {}  # generate's cache (weak reference), padding mask and position ids of the last forward
        self.new_call = False  # a prefill was seen: a new generate call
        self.plan_next: "Plan | None" = None
        self.ahead: "Ahead | None" = None
        self.kept: "Kept | None" = None
        self.prompt_mask = None


def _per_call(name: str) -> property:
    return property(lambda self: getattr(self._state, name), lambda self, value: setattr(self._state, name, value),
                    doc=f"`{name}` of the generate call running in this thread")


class GenerateHooks:
    """Forward hooks on `model` for one `MaraProcessor` (see the module docstring).

    `keep_first`: generate emits the candidate the processor decided, one sequence per row (greedy decoding, or a
    sampled veto's draw), so the first speculated candidate's cache entry may serve the next step when generate
    emits it. Everything a call leaves
    here is per thread (`_CallState`) and forgotten at the next call's prefill.
    """

    keep_first = _per_call("keep_first")
    paused_now = _per_call("paused_now")
    forwards = _per_call("forwards")
    seen = _per_call("seen")
    new_call = _per_call("new_call")
    plan_next = _per_call("plan_next")
    ahead = _per_call("ahead")
    kept = _per_call("kept")
    prompt_mask = _per_call("prompt_mask")

    def __init__(self, model, keep_first: bool):
        self.model = model
        self._state = _CallState(keep_first)
        self._handles = []

    # ----- attaching ----------------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self):
        if self._handles:
            return
        ref = weakref.ref(self)
        model = self.model
        self._handles = [
            model.register_forward_pre_hook(lambda m, a, kw: _call(ref, "_capture", a, kw), with_kwargs=True),
            model.base_model.register_forward_hook(lambda m, a, out: _call(ref, "_keep_states", out)),
            model.register_forward_hook(lambda m, a, kw, out: _call(ref, "_restore", kw, out), with_kwargs=True),
        ]

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._state = _CallState()

    def __del__(self):
        for handle in getattr(self, "_handles", []):
            handle.remove()

    @contextmanager
    def paused(self):
        """Stand aside for the forwards made inside this block (the processor's own scoring forwards)."""
        before, self.paused_now = self.paused_now, True
        try:
            yield
        finally:
            self.paused_now = before

    def take_ahead(self) -> "Ahead | None":
        """What the last forward scored on the way (None when nothing), and forget the plan."""
        ahead, self.ahead, self.plan_next = self.ahead, None, None
        return ahead

    # ----- planning -----------------------------------------------------------------------------------------------
    def plan(self, length: int, cands, index, states, top_k: int, top_p: float, width: "int | None", stats,
             order=None):
        """From the emitted candidates' states, the next step's likely first candidates (`width` of them, None: the
        whole set), for generate's next forward to score on the way. `order(candidates, logits)`, when given, puts
        the next candidates in the order they will be judged (sampling: drawn; default: by probability)."""
        rows = torch.arange(index.shape[0], device=index.device)
        known = index < states.shape[1]
        hidden = states[rows, index.clamp(max=states.shape[1] - 1)]
        logits = self.model.get_output_embeddings()(hidden)
        nxt = candidate_set(logits.float(), top_k, top_p)
        if order is not None:
            nxt = order(nxt, logits.float())
        width = nxt.ids.shape[1] if width is None else width
        plan = Plan(ids=nxt.ids[:, :width], valid=nxt.mask[:, :width] & known[:, None], length=length,
                    cache=self.seen.get("cache"), stats=stats)
        if bool(known.all()) and hidden.dtype in (torch.float32, torch.float64):
            # These are the logits generate's next forward computes for the emitted tokens: offer them, so that
            # forward can skip its LM head (`_capture`, `_restore`). Half precision: the tree forward's states differ
            # from generate's by rounding that may move a token, so generate computes its own.
            plan.token, plan.state, plan.logits = cands.ids[rows, index], hidden, logits
        self.plan_next = plan

    # ----- what generate computed -----------------------------------------------------------------------------
    def prefix(self, input_ids, warn_slow):
        """generate's cache, padding mask and next positions for the step of `input_ids` (as the last forward saw
        them), or the prefix re-encoded in a fresh cache when generate's cannot be shared (`warn_slow` says so)."""
        batch, length = input_ids.shape
        seen = self.seen
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
            warn_slow("MaraProcessor re-encodes the prefix at every step because generate's KV cache cannot be "
                           f"shared (use_cache=False or an unsupported cache type: {type(cache).__name__}): this is "
                           "slow.")
        # Full-attention storage: sliding windows are applied by the masks, so nothing falls out of the cache.
        cache = DynamicCache()
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else None
        base = self.model.base_model
        base(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg(base): cache})
        return cache, mask, next_positions(length, mask, None, batch, input_ids.device)

    # ----- the hooks ----------------------------------------------------------------------------------------------
    def _capture(self, args, kwargs):
        """Pre-hook on the LLM: remember generate's cache, mask and positions for the coming scores, and add the
        planned lookahead candidates to generate's decode step."""
        if self.paused_now:
            return None
        self.forwards += 1
        cache = cache_from_kwargs(kwargs)
        if in_prefill() or (cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
            # prefill: a new generate call (also one continuing a cache, or one after a call that raised), maybe one
            # the processor takes no part in (plain generate, another processor, serial_generate): nothing planned
            # or kept in an earlier call is used; the processor resets lazily, at its next call, so its stats
            # survive the calls it takes no part in.
            self.new_call = True
            LAST_CALL.pop(self.model, None)
            self.plan_next = None
            self.kept = None
            self.ahead = None
        # Weak references: after generate returns, its KV cache must not be kept alive by the processor.
        self.seen = {"cache": weakref.ref(cache) if cache is not None else None,
                     "attention_mask": self._padding_mask(kwargs, cache), "position_ids": kwargs.get("position_ids")}
        plan, self.plan_next = self.plan_next, None
        ids = kwargs.get("input_ids")
        if (plan is None or args or ids is None or ids.shape != (plan.ids.shape[0], 1) or plan.cache is None
                or cache is not plan.cache() or cache.get_seq_length() != plan.length
                or kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
                or kwargs.get("inputs_embeds") is not None):
            return None
        batch, width = plan.ids.shape
        length = plan.length  # tokens in the cache; generate's new token goes at index `length`
        mask2d = self.seen["attention_mask"]
        if mask2d is not None:
            if mask2d.dim() != 2 or mask2d.shape[1] != length + 1:
                return None  # a mask this does not understand: leave generate's step alone
            mask2d = None if bool(mask2d.all()) else mask2d
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = next_positions(length, None if mask2d is None else mask2d[:, :-1], None, batch, ids.device)[:, None]
        if not shareable(cache) or not Scratch.can_keep_some(cache) or room(cache) < 1 + width:
            return None
        dtype = next(self.model.parameters()).dtype
        reuse = plan.logits is not None and "logits_to_keep" in kwargs and bool((ids[:, 0] == plan.token).all())
        # Deferred: generate's token is the candidate the last forward speculated and scored, whose cache entry was
        # put aside (`_restore`): put it back and run only the new candidates. One query less per forward, which on
        # a CPU at batch 1 is most of the lookahead's cost.
        kept = self.kept if reuse else None
        deferred = (kept is not None and kept.cache() is cache and kept.length == length
                    and bool((ids[:, 0] == kept.token).all()))
        self.kept = None
        try:
            if deferred:
                for i, (k, v) in enumerate(kept.kv):
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
            kwargs = dict(kwargs, input_ids=plan.ids, position_ids=ahead_pos, attention_mask=mask)
        else:
            kwargs = dict(kwargs, input_ids=torch.cat([ids, plan.ids], dim=1),
                          position_ids=torch.cat([pos, ahead_pos], dim=1), attention_mask=mask)
        if "logits_to_keep" in kwargs:  # only generate's token needs logits, none when the planned ones can serve
            kwargs["logits_to_keep"] = torch.tensor([] if reuse else [0], dtype=torch.long, device=ids.device)
        # The states computed are true states of whatever prefix and token the rows hold now (beams may have
        # reordered them); the processor uses them only for candidates whose ids match the real candidate set.
        self.ahead = Ahead(ids=plan.ids, valid=plan.valid, width=width, scratch=Scratch(cache).begin(),
                           reuse=plan if reuse else None, deferred=deferred,
                           keep=self.keep_first and all(type(layer) is DynamicLayer for layer in cache.layers),
                           cache=weakref.ref(cache), length=length + 1)
        plan.stats.scored += batch * width
        return args, kwargs

    def _padding_mask(self, kwargs, cache):
        """generate's 2D padding mask for this forward. With a static cache generate passes a prepared 4D mask (or
        one per layer type) instead; then the padding is the prompt's, recorded at the prefill (from its 2D mask,
        or, when that is prepared too, from its position ids: generate gives left padding position 0, like the first
        real token; no mask at all means no padding), followed by ones."""
        mask = kwargs.get("attention_mask")
        pos, ids = kwargs.get("position_ids"), kwargs.get("input_ids")
        length = seq_length(cache) if cache is not None and hasattr(cache, "get_seq_length") else None
        if length == 0 and ids is not None:  # a prefill: a new generate call
            if mask is None:
                self.prompt_mask = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
            elif torch.is_tensor(mask) and mask.dim() == 2:
                self.prompt_mask = mask
            elif pos is not None and pos.dim() == 2:
                # the last 0 of a row is its first real token: everything before it is left padding
                index = torch.arange(pos.shape[1], device=pos.device)
                first = torch.where(pos == 0, index, -1).amax(-1, keepdim=True)
                real = (index >= first).long()
                self.prompt_mask = real if bool((pos == (real.cumsum(-1) - 1).clamp(min=0)).all()) else None
            else:
                self.prompt_mask = None
        if mask is None or (torch.is_tensor(mask) and mask.dim() == 2):
            return mask
        prompt = self.prompt_mask
        if prompt is None or ids is None or length is None or prompt.shape[0] != ids.shape[0]:
            return mask  # not understood: the processor refuses it clearly, `_capture` leaves generate's step alone
        total = length + ids.shape[1]
        return torch.cat([prompt, prompt.new_ones(prompt.shape[0], max(total - prompt.shape[1], 0))], dim=1)[:, :total]

    def _keep_states(self, out):
        """Hook on the base model: keep the lookahead candidates' last hidden states."""
        ahead = self.ahead
        if not self.paused_now and ahead is not None and ahead.states is None:
            if ahead.deferred:  # generate's token was not in this forward: every query is a candidate
                ahead.states = out.last_hidden_state
            else:
                ahead.states = out.last_hidden_state[:, 1:]
                ahead.token_state = out.last_hidden_state[:, 0]

    def _restore(self, kwargs, out):
        """Hook on the LLM: make generate's step look plain again (cache cropped, one position of logits)."""
        ahead = self.ahead
        if self.paused_now or ahead is None or ahead.restored:
            return None
        cache = ahead.cache()
        if ahead.keep and cache is not None:  # put the first candidate's entry aside for a deferred next step
            at = ahead.length
            self.kept = Kept(kv=[(layer.keys[:, :, at:at + 1].clone(), layer.values[:, :, at:at + 1].clone())
                                 for layer in cache.layers], token=ahead.ids[:, 0], cache=ahead.cache, length=at)
        ahead.scratch.end(ahead.width)
        ahead.restored = True
        if ahead.reuse is not None and ahead.deferred:  # the planned logits are those of the entry put back
            out.logits = ahead.reuse.logits[:, None]
        elif ahead.reuse is not None:  # the LM head was skipped: the planned logits, if they are this state's
            planned, state = ahead.reuse, ahead.token_state
            # Same prefix and token give the same state up to float32 rounding; anything else (rows reordered by beam
            # search, another token) differs grossly and gets generate's own logits.
            same = (state - planned.state).abs().amax() <= 1e-4 * state.abs().amax()
            out.logits = (planned.logits if bool(same) else self.model.get_output_embeddings()(state))[:, None]
        elif out.logits is not None and out.logits.shape[1] > 1:
            out.logits = out.logits[:, :1]
        return out


def _call(ref, name, *args):
    """Run hook `name` of the `GenerateHooks` behind the weak reference `ref`, if it still exists."""
    hooks = ref()
    return None if hooks is None else getattr(hooks, name)(*args)


def _cache_matches(cache, batch: int, length: int) -> bool:
    """True when `cache` is a cache this processor can share (see `caches`) holding exactly this batch's prefix."""
    if cache is None or not shareable(cache):
        return False
    try:
        return seq_length(cache) == length and cache.layers[0].keys.shape[0] == batch
    except (AttributeError, IndexError, TypeError):
        return False
