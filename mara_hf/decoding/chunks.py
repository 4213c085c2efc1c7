"""How many candidates each scoring forward takes: the chunk schedule of a decoding call.

Candidates are judged in probability order; a forward of a few candidates costs about one candidate's at batch 1
(memory-bound), while with many rows every scored candidate costs compute. The schedule picks the first chunk and
whether later chunks double. Tokens never depend on it: scoring stops at the same accept whatever the chunks are.
"""

import torch


def chunk_schedule(chunk_size, batch: int) -> tuple[int | None, bool]:
    """(first chunk, whether later chunks double) for a `chunk_size` setting: an int is a fixed chunk, None all
    candidates at once, "auto" 8 at batch 1 (which `ChunkFit` narrows to the agent) and 1, then 2, 4, 8... for larger batches. Why: a forward of a few
    tokens costs about one token's at batch 1 (memory-bound), while with many rows every scored candidate costs
    compute and most rows accept their first candidate; doubling bounds the forwards a row that rejects many
    candidates makes the others wait (docs/benchmarks.md). `ChunkFit` fits "auto" at batch 1 to the agent."""
    if chunk_size == "auto":
        return (8, False) if batch == 1 else (1, True)
    return chunk_size, False


# Cost of one scoring forward of w candidates at batch 1, relative to one of a single candidate: 1 + slope (w - 1).
# CPU: measured on SmolLM2-135M float32, prefix ~100 tokens (w1 52 ms, w4 77, w8 80, w16 111; docs/benchmarks.md).
# Elsewhere a forward of a few tokens is memory-bound and costs about one token's; that slope is assumed, not measured.
WIDTH_COST = {"cpu": 0.075}
WIDTH_COST_OTHER = 0.01


class ChunkFit:
    """The chunk schedule of one decoding call, fitted to what the agent has been doing in it.

    With `chunk_size="auto"` at batch 1, each step's first chunk is the width (1 to 8) with the least expected
    scoring cost over the call's decisions so far, chunks doubling after a miss: the expected cost of first width
    w is the mean, over the accepted-index histogram (fallbacks as a miss of every candidate), of the forwards it
    takes to reach that index, each costing `1 + slope (width - 1)` (`WIDTH_COST`). An agent that accepts its top
    candidate scores one candidate a step; one that rejects often scores several in one forward. The first
    decision of a call scores one. Any other setting, or a batch, follows `chunk_schedule`. Tokens never depend
    on the chunks: scoring stops at the same accept whatever they are.
    """

    def __init__(self, chunk_size):
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.fitted = (-1, 1)  # (decisions seen, first chunk fitted to them)
        self._costs = None  # (widths, top_k + 1) expected forwards' cost of each first width, per accepted index

    def __call__(self, batch: int, stats) -> tuple[int | None, bool]:
        chunk, grow = chunk_schedule(self.chunk_size, batch)
        if self.chunk_size != "auto" or batch != 1 or stats is None:
            return chunk, grow
        decisions = stats.decisions
        if decisions == 0:
            return 1, True
        if decisions != self.fitted[0]:
            seen = torch.cat([stats._index, stats._counts[4:5]]).float()  # accepts by index, then fallbacks
            if self._costs is None:
                slope = WIDTH_COST.get(seen.device.type, WIDTH_COST_OTHER)
                self._costs = width_costs(chunk, stats._index.numel(), slope).to(seen.device)
            # one sync: the cheapest first width (the narrowest of equals)
            self.fitted = (decisions, int((self._costs @ seen).argmin()) + 1)
        return self.fitted[1], True


def width_costs(max_width: int, top_k: int, slope: float) -> torch.Tensor:
    """`(max_width, top_k + 1)`: the cost of scoring, with first chunk w (row w - 1) doubling after each miss, up
    to candidate i (column i), or every candidate (last column, a fallback); a forward of n costs 1 + slope (n - 1)."""
    costs = torch.zeros(max_width, top_k + 1, dtype=torch.float64)
    for w in range(1, max_width + 1):
        for i in range(top_k + 1):
            lo, n, cost = 0, w, 0.0
            while lo <= min(i, top_k - 1):
                n = min(n, top_k - lo)
                cost += 1 + slope * (n - 1)
                lo, n = lo + n, n * 2
            costs[w - 1, i] = cost
    return costs.float()


def check_chunk_size(chunk_size):
    if not (chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size >= 1)):
        raise ValueError(f"chunk_size must be 'auto', None or an int >= 1, got {chunk_size!r}.")
