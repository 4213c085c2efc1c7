"""What MARA needs to know about a model's attention layers and KV caches, found by inspection, not by model name.

Candidates are scored by appending them to a cache that holds the prefix ("tree" attention, see `candidates`),
then removing them. That needs, per attention layer, a 4D mask sized like the keys the layer's cache returns
(`get_mask_sizes`), with the layer's sliding window applied relative to each candidate's own position, and a way
to take the candidates out of the cache again:

- `DynamicLayer`: `crop`.
- `DynamicSlidingWindowLayer`: keeps only the last `window - 1` entries, so appending candidates would push prefix
  entries out; with past recording on during our forward it keeps them until `crop`.
- `StaticLayer`: preallocated, written at its running length: rolling that length back is enough (the entries
  written past it are masked by causality until generate overwrites them). It has no room past `max_cache_len`.
- `StaticSlidingWindowLayer`: rolls its buffer in place: snapshot and restore it (`window` entries).

Any other layer (quantized, linear attention, ...) or layer type other than full / sliding attention: the
callers fall back to paths that need none of this (see `MaraProcessor`, `loop.decode`).
"""

import inspect
import weakref

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

try:
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # older transformers 5.x: read the config's fields directly (see `_layer_types`)
    get_layer_types_and_kwargs = None

SHAREABLE = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
_KNOWN_TYPES = ("full_attention", "sliding_attention")


# transformers 5.24 renamed the forward's `past_key_values` argument to `cache` (the old name warns until 5.40).
_CACHE_ARG_NAMES = ("cache", "past_key_values")
_cache_arg_of_class = {}


def cache_arg(module) -> str:
    """The name under which `module`'s forward takes its KV cache."""
    cls = type(module)
    if cls not in _cache_arg_of_class:
        params = inspect.signature(cls.forward).parameters
        _cache_arg_of_class[cls] = next((n for n in _CACHE_ARG_NAMES if n in params), "past_key_values")
    return _cache_arg_of_class[cls]


def cache_from_kwargs(kwargs):
    """The KV cache in a forward's keyword arguments (as `generate` passes it, under either name), or None."""
    for name in _CACHE_ARG_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


# What `layer_layout` and `accepts_mask_dict` found per base model, kept here rather than on the user's model.
LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MASK_DICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class MasksUnsupported(Exception):
    """The model's layers need masks that cannot be handed to its forward (raised before any forward)."""


def layer_layout(model):
    """`(layer_types, windows)` of the model's decoder layers (window None for full attention), or None when some
    layer is neither full nor sliding-window attention (chunked, linear, KV-shared, ...)."""
    model = getattr(model, "base_model", model)  # one cached answer for the LM and its base model
    if model in LAYOUTS:
        return LAYOUTS[model]
    try:
        types, kwargs = _layer_types(model.config.get_text_config(decoder=True))
        layout = None
        if all(t in _KNOWN_TYPES for t in types):
            layout = (list(types), [kw.get("sliding_window") if t == "sliding_attention" else None
                                    for t, kw in zip(types, kwargs)])
    except Exception:  # a config this cannot read: treat as unknown
        layout = None
    LAYOUTS[model] = layout
    return layout


def _layer_types(config):
    if get_layer_types_and_kwargs is not None:
        return get_layer_types_and_kwargs(config)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers)
    return types, [{"sliding_window": window} if t == "sliding_attention" else {} for t in types]


def shareable(cache) -> bool:
    """True for caches whose every layer is one of the kinds whose candidates this module can take out again."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer) in SHAREABLE and getattr(layer, "is_initialized", False)
        # dynamic sliding layers can give back appended entries only with past recording (transformers >= 5.x)
        and (type(layer) is not DynamicSlidingWindowLayer or hasattr(layer, "record_past"))
        for layer in layers)


def seq_length(cache) -> int:
    """Tokens in the cache, as a Python int (static layers count with a tensor)."""
    return int(cache.get_seq_length())


def room(cache) -> int | float:
    """How many entries can still be written: bounded only by full-attention static layers."""
    free = [layer.max_cache_len - int(layer.cumulative_length) for layer in cache.layers
            if type(layer) is StaticLayer]
    return min(free) if free else float("inf")


def accepts_mask_dict(model) -> bool:
    """Whether the model's forward takes `{layer_type: 4D mask}` as `attention_mask` (hybrid models in transformers
    5 do). Probed once with a one-token forward; a model that does not take a dict fails on it."""
    model = getattr(model, "base_model", model)
    if model in MASK_DICTS:
        return MASK_DICTS[model]
    layout = layer_layout(model)
    ok = False
    if layout is not None:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        masks = {t: torch.zeros(1, 1, 1, 1, dtype=dtype, device=device) for t in set(layout[0])}
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), attention_mask=masks,
                      position_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
            ok = True
        except Exception:
            ok = False
    MASK_DICTS[model] = ok
    return ok


def tree_masks(model, cache, prefix_mask, own, at, upto, dtype, device):
    """The attention mask(s) for a forward of `n` queries on `cache`, as the model's forward takes them.

    Query j writes its entry at cache index `own[j]`, counts as position `at[j]` for sliding windows, and sees the
    first `upto[j]` cache entries (minus padding, `prefix_mask` `(batch, >= max(upto))`, None for none) and its
    own entry only. Window semantics as in transformers: a query at index q sees keys at indices > q - window.
    Returns one additive 4D tensor when every layer needs the same mask, else `{layer_type: mask}` when the model
    takes that, else raises `MasksUnsupported`.
    """
    layout = layer_layout(model)
    if layout is None:
        raise MasksUnsupported("layer types other than full and sliding-window attention")
    types, windows = layout
    n = len(own)
    own = torch.as_tensor(own, device=device)[:, None]
    at = torch.as_tensor(at, device=device)[:, None]
    upto = torch.as_tensor(upto, device=device)[:, None]
    batch = prefix_mask.shape[0] if prefix_mask is not None else 1
    masks, by_type = {}, {}
    for i, layer in enumerate(cache.layers[:len(types)]):
        kv_length, kv_offset = layer.get_mask_sizes(n)
        window = windows[i]
        key = (int(kv_length), int(kv_offset), window)
        if key not in masks:
            index = torch.arange(int(kv_offset), int(kv_offset) + int(kv_length), device=device)[None]
            seen = index < upto
            if window is not None:
                seen &= index > at - window
            allowed = (seen[None] & _padding(prefix_mask, index[0], batch)[:, None]) | (index == own)[None]
            masks[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)[:, None]
        by_type.setdefault(types[i], set()).add(key)
    if len(masks) == 1:
        return next(iter(masks.values()))
    if any(len(keys) > 1 for keys in by_type.values()) or not accepts_mask_dict(model):
        raise MasksUnsupported("layers of the same type need different masks, or the model takes one mask for all")
    return {t: masks[next(iter(keys))] for t, keys in by_type.items()}


def _padding(prefix_mask, index, batch):
    """`(batch, len(index))`: which cache indices hold real tokens (indices past the mask count as real)."""
    if prefix_mask is None:
        return torch.ones(batch, len(index), dtype=torch.bool, device=index.device)
    width = prefix_mask.shape[1]
    out = torch.ones(batch, len(index), dtype=torch.bool, device=index.device)
    inside = index < width
    out[:, inside] = prefix_mask[:, index[inside]].bool()
    return out


class Scratch:
    """Append entries to a shareable cache for one forward, then take exactly `n` trailing ones out again.

    `begin()` before the forward (turns on past recording of dynamic sliding layers, snapshots static sliding
    ones); `end(n)` after it removes the last `n` entries. `end` with `n` equal to what the forward added leaves
    the cache as it was; a smaller `n` (keep generate's own token) is only possible without static sliding layers.
    """

    def __init__(self, cache):
        self.cache = cache
        self.snapshots = {}

    @staticmethod
    def can_keep_some(cache) -> bool:
        return not any(type(layer) is StaticSlidingWindowLayer for layer in cache.layers)

    def begin(self):
        for i, layer in enumerate(self.cache.layers):
            if type(layer) is DynamicSlidingWindowLayer:
                layer.record_past = True
            elif type(layer) is StaticSlidingWindowLayer:
                self.snapshots[i] = (layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone(),
                                     layer.cumulative_length_int)
        return self

    def end(self, n: int):
        for i, layer in enumerate(self.cache.layers):
            kind = type(layer)
            if kind is DynamicSlidingWindowLayer:
                layer.crop(-n)
                layer.record_past = False
            elif kind is DynamicLayer:
                layer.crop(-n)
            elif kind is StaticSlidingWindowLayer:
                keys, values, length, length_int = self.snapshots[i]
                layer.keys.copy_(keys)
                layer.values.copy_(values)
                layer.cumulative_length.copy_(length)
                layer.cumulative_length_int = length_int
            elif kind is StaticLayer:
                layer.cumulative_length.sub_(n)


def row_subset(cache, rows: torch.LongTensor):
    """A new `DynamicCache` holding only `rows` of `cache`, or None when `cache` is not a plain dynamic cache of
    full-attention layers (the only kind whose rows can simply be copied out). The copy is cheap next to a forward
    of every row: a batch where few rows still need candidates scores those rows alone."""
    from transformers import DynamicCache

    if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    sub = DynamicCache()
    for i, layer in enumerate(cache.layers):
        sub.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
    return sub
