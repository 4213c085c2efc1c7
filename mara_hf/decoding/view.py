"""A view of what the agent did in one traced call: the response(s) with every decision marked.

`mara.stats.view(tokenizer)` after a call made with `MaraProcessor(..., trace=True)`. Each position of a response
is a token; where the agent decided (more than one candidate), the position keeps the candidates in the order they
were judged (probability order, or the drawn order when sampling), their P(accept) and the one emitted. A position
is *steered* where the emitted token is not the one the LLM would have emitted on its own (the first candidate: its
most probable under greedy decoding, its draw when sampling). The first steered position is where the response
parts from the LLM's own. Rendered as text for terminals (`str`, coloured on a TTY) and as self-contained HTML for
notebooks (`_repr_html_`), the model's text escaped.
"""

import html
import os
import sys
import unicodedata
from dataclasses import dataclass

# ANSI styles of the terminal view
_RED, _GREEN, _YELLOW, _DIM, _BOLD, _STRIKE, _RESET = (
    "\033[31m", "\033[32m", "\033[33m", "\033[2m", "\033[1m", "\033[9m", "\033[0m")


@dataclass(frozen=True)
class Candidate:
    """One candidate of a decision: its token, text, the LLM's log-probability, the agent's P(accept) and verdict
    (both None when it was not judged: the decision was made before reaching it)."""

    token: int
    text: str
    logprob: float
    p_accept: float | None
    accepted: bool | None


@dataclass(frozen=True)
class Position:
    """One token of a response. `candidates` is empty where there was nothing to decide (a single candidate);
    otherwise `chosen` is the emitted candidate's place among them and `fallback` says every judged candidate was
    rejected."""

    token: int
    text: str
    candidates: tuple[Candidate, ...] = ()
    chosen: int = 0
    fallback: bool = False

    @property
    def decided(self) -> bool:
        return bool(self.candidates)

    @property
    def steered(self) -> bool:
        """The agent changed the token: the emitted one is not the LLM's own choice (the first candidate)."""
        return self.decided and self.token != self.candidates[0].token

    @property
    def rejected(self) -> list[Candidate]:
        """The judged candidates the agent rejected, in the order judged."""
        return [c for c in self.candidates if c.accepted is False]


@dataclass(frozen=True)
class Row:
    """One response: its positions, a label (the prompt, when given) and whether it ended (an end token)."""

    positions: tuple[Position, ...]
    label: str | None = None
    ended: bool = False

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.positions)

    @property
    def decisions(self) -> int:
        return sum(p.decided for p in self.positions)

    @property
    def steered(self) -> list[int]:
        """The positions where the agent changed the token."""
        return [i for i, p in enumerate(self.positions) if p.steered]

    @property
    def fallbacks(self) -> int:
        return sum(p.fallback for p in self.positions)

    def summary(self) -> str:
        steered = self.steered
        parted = f", first at token {steered[0]}" if steered else ""
        return (f"{len(self.positions)} tokens, {self.decisions} decisions, {len(steered)} steered{parted}, "
                f"{self.fallbacks} with every candidate rejected")


class DecisionView:
    """The responses of a traced call with the agent's decisions marked (see the module docstring).

    `rows` holds the data (`Row` > `Position` > `Candidate`) for code that wants it; `str(view)` and
    `view.text(color=...)` render it for a terminal, `view._repr_html_()` for a notebook.
    """

    def __init__(self, rows: list[Row], first: int = 0):
        self.rows = rows
        self.first = first  # the number of the first row (a view of one row of a batch keeps its number)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> "DecisionView":
        """The view of one row (numbered as in the whole view's text)."""
        return DecisionView([self.rows[index]], first=self.first + index % len(self.rows))

    @classmethod
    def from_stats(cls, stats, tokenizer, prompts: "list[str] | None" = None, sequences=None) -> "DecisionView":
        if not stats.traced:
            raise ValueError("Nothing to view: build the processor with trace=True, MaraProcessor(..., trace=True), "
                             "and generate with it first.")
        if stats.mode == "beams":
            raise ValueError("The view shows greedy and sampled calls: under beam search the processor's rows are "
                             "beams that generate reorders, not responses.")
        if not stats.tokens:
            raise ValueError("Nothing to view yet: generate with this processor first.")
        import torch

        tokens = torch.stack(stats.tokens, dim=1).tolist()
        if sequences is not None:  # generate's output: its last columns are the tokens of the traced steps
            sequences = getattr(sequences, "sequences", sequences)
            if tuple(sequences.shape)[:1] != (len(tokens),) or sequences.shape[1] < len(tokens[0]):
                raise ValueError(f"sequences of shape {tuple(sequences.shape)} are not the output of the traced call "
                                 f"({len(tokens)} rows, {len(tokens[0])} new tokens).")
            tokens = sequences[:, sequences.shape[1] - len(tokens[0]):].tolist()
        if prompts is not None and len(prompts) != len(tokens):
            raise ValueError(f"{len(prompts)} prompts given for a call of {len(tokens)} rows: pass one per row.")
        ends = set(stats.ends) or {tokenizer.eos_token_id}
        by_place = {(rec["row"], rec["step"]): rec for rec in stats.trace}
        rows = []
        for r, row_tokens in enumerate(tokens):
            stop = next((i for i, t in enumerate(row_tokens) if t in ends), None)
            kept = row_tokens if stop is None else row_tokens[:stop]
            texts = _pieces(tokenizer, kept)
            positions = []
            for step, (token, text) in enumerate(zip(kept, texts)):
                rec = by_place.get((r, step))
                if rec is None:
                    positions.append(Position(token, text))
                    continue
                cands = tuple(Candidate(c, tokenizer.decode([c]), lp, p, a) for c, lp, p, a in zip(
                    rec["candidates"], rec["logprobs"], rec["p_accept"], rec["accepted"]))
                chosen = next((i for i, c in enumerate(cands) if c.token == token), rec["index"])
                positions.append(Position(token, text, cands, chosen, rec["fallback"]))
            rows.append(Row(tuple(positions), None if prompts is None else prompts[r], stop is not None))
        return cls(rows)

    # ----- terminal -------------------------------------------------------------------------------------------
    def text(self, color: bool | None = None) -> str:
        """The view as text: each row's summary line, then the response with each steered or all-rejected position
        written `[✗"Sure" 0.02 ✗"Here" 0.10 → "I" 0.93]`: the candidates judged before the emitted one (the first
        three, and how many more) with P(accept), ✗ rejected, ✓ accepted (under `max_prob`). `color`: ANSI colours
        (default: when standard output is a terminal and NO_COLOR is unset)."""
        if color is None:
            color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        paint = (lambda style, s: f"{style}{s}{_RESET}") if color else (lambda style, s: s)
        out = []
        for r, row in enumerate(self.rows, start=self.first):
            label = f" {_short(row.label)!r}" if row.label else ""
            out.append(paint(_BOLD, f"Row {r}{label}: {_visible(row.summary())}"))
            pieces = []
            for p in row.positions:
                if not (p.steered or p.fallback):
                    pieces.append(_visible(p.text))
                    continue
                before, more = _shown(p)
                judged = [paint(_RED + _STRIKE if not c.accepted else _DIM, f"{_mark(c)}{_quoted(c.text)}")
                          + paint(_DIM, f" {_p(c)}") for c in before]
                if more:
                    judged.append(paint(_DIM, f"+{more} more"))
                if p.fallback:
                    judged.insert(0, paint(_YELLOW, "all rejected:"))
                emitted = paint(_GREEN + _BOLD, _quoted(p.text)) + paint(_DIM, f" {_p(p.candidates[p.chosen])}")
                pieces.append(f"[{' '.join(judged)} → {emitted}]")
            out.append("".join(pieces) + ("" if row.ended else paint(_DIM, " …")))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return self.text()

    # ----- notebook -------------------------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        """Self-contained HTML: no scripts, no external assets; every text from the model escaped."""
        rows = []
        for r, row in enumerate(self.rows, start=self.first):
            label = f" <q>{_esc(_short(row.label))}</q>" if row.label else ""
            steered = row.steered
            spans = []
            for i, p in enumerate(row.positions):
                text = _esc(p.text)
                if not p.decided:
                    spans.append(text)
                    continue
                title = _esc("\n".join(
                    f"{'→ ' if k == p.chosen else '  '}{c.text!r}  logprob {c.logprob:.2f}  "
                    f"P(accept) {_p(c)}{'' if c.accepted is None else (' accepted' if c.accepted else ' rejected')}"
                    for k, c in enumerate(p.candidates)))
                if not (p.steered or p.fallback):
                    spans.append(f'<span class="mv-d" title="{title}">{text}</span>')
                    continue
                before, more = _shown(p)
                struck = "".join(f'<s class="mv-x">{_esc(c.text)}<sub>{_p(c)}</sub></s>' if not c.accepted else
                                 f'<span class="mv-a">{_esc(c.text)}<sub>{_p(c)}</sub></span>' for c in before)
                struck += f'<span class="mv-more">+{more} </span>' if more else ""
                cls = "mv-s" + (" mv-f" if p.fallback else "") + (" mv-first" if steered and i == steered[0] else "")
                spans.append(f'<span class="{cls}" title="{title}">{struck}<b>{text}</b></span>')
            end = "" if row.ended else '<span class="mv-more"> …</span>'
            rows.append(f'<div class="mv-row"><div class="mv-head">Row {r}{label}: {_esc(row.summary())}</div>'
                        f'<div class="mv-text">{"".join(spans)}{end}</div></div>')
        return f'<div class="mara-view">{_STYLE}{_LEGEND}{"".join(rows)}</div>'


_STYLE = """<style>
.mara-view{font-family:ui-sans-serif,system-ui,sans-serif;font-size:14px;line-height:1.9;color:#1f2328;
 background:#fff;padding:8px;border:1px solid #d0d7de;border-radius:6px}
.mara-view .mv-head{font-weight:600;margin-top:6px}
.mara-view .mv-text{white-space:pre-wrap;font-family:ui-monospace,monospace}
.mara-view .mv-s{background:#dafbe1;border-radius:3px;padding:1px 2px}
.mara-view .mv-s b{color:#116329}
.mara-view .mv-f{background:#fff8c5}
.mara-view .mv-first{outline:2px solid #0969da}
.mara-view .mv-x{color:#cf222e;margin-right:3px}
.mara-view .mv-x sub,.mara-view .mv-a sub{font-size:10px}
.mara-view .mv-a{color:#656d76;margin-right:3px}
.mara-view .mv-legend,.mara-view .mv-more{color:#656d76;font-size:12px}
</style>"""
_LEGEND = ('<div class="mv-legend"><span class="mv-s"><s class="mv-x">rejected<sub>P(accept)</sub></s><b>emitted'
           '</b></span> the agent changed the token &nbsp; <span class="mv-s mv-first">outlined</span> where the '
           'response parts from the LLM\'s own &nbsp; <span class="mv-s mv-f">yellow</span> every candidate rejected '
           '&nbsp; hover a token for its candidates</div>')


def _pieces(tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds to the decoded response (decoding token by token would split characters that span
    several tokens)."""
    pieces, before = [], ""
    for i in range(len(tokens)):
        now = tokenizer.decode(tokens[:i + 1])
        pieces.append(now[len(before):] if now.startswith(before) else tokenizer.decode(tokens[i:i + 1]))
        before = now
    return pieces


def _shown(p: Position, most: int = 3) -> tuple[list[Candidate], int]:
    """The judged candidates before the emitted one that a view writes out (the first `most`), and how many more."""
    judged = [c for c in p.candidates[:p.chosen] if c.accepted is not None]
    return judged[:most], max(len(judged) - most, 0)


def _mark(c: Candidate) -> str:
    return "✓" if c.accepted else "✗"


def _p(c: Candidate) -> str:
    return "not judged" if c.p_accept is None else f"{c.p_accept:.2f}"


def _quoted(text: str) -> str:
    return '"' + _visible(text, keep="") + '"'


def _visible(text: str, keep: str = "\n\t") -> str:
    """`text` safe to print on a terminal: control and format characters (escape sequences, carriage returns,
    bidirectional overrides, zero-width characters, line separators) written as escapes such as `\\x1b` or
    `\\u202e`, except those in `keep` (the line breaks and tabs of a response). What the HTML view does with
    `html.escape` for markup."""
    return "".join(ch if ch in keep or unicodedata.category(ch) not in _HIDDEN else _escape(ch) for ch in text)


# Unicode categories a terminal acts on, or shows as nothing: control, format (bidirectional overrides, zero-width
# characters), line and paragraph separators, lone surrogates
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def _escape(ch: str) -> str:
    code = ord(ch)
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def _short(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
