"""The decision view (`mara.stats.view(tokenizer)`): what it shows is what was generated and what the agent decided,
checked against independent forwards of the LLM and the agent; the HTML is self-contained and escapes the text."""

import pytest
import torch
from tiny_models import EOS, calibrated_agent, random_prompts, tiny_llama

from mara_hf.decoding.view import DecisionView

TOP_K, TOP_P = 10, 0.9
NEW = 14


class MarkupTokenizer:
    """A stand-in tokenizer whose every token decodes to markup, so that unescaped model text would show."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<script>x{i}</script>&" if i % 7 == 0 else f"t{i} " for i in ids)


@pytest.fixture(scope="module")
def llama(one_thread):
    return tiny_llama()


@pytest.fixture(scope="module")
def strict(llama):
    return calibrated_agent(llama, seed=0, rate=0.3)  # rejects often: many steered positions


@pytest.fixture
def prompts():
    return random_prompts(batch=3, length=7, pads=(3, 1, 0), seed=2)


def new_tokens(out, ids):
    return out[:, ids.shape[1]:].tolist()


def until_eos(tokens):
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


@torch.no_grad()
def own_choice_and_states(llama, ids, mask, row, tokens):
    """By plain full forwards (no cache, no MARA code): the LLM's most probable next token at each position of a
    row's response, and a function giving the last hidden state after a response prefix and one candidate."""
    prompt = ids[row][mask[row].bool()]

    def state_after(prefix, token):
        seq = torch.cat([prompt, torch.tensor(prefix + [token])])[None]
        return llama.model(input_ids=seq).last_hidden_state[0, -1]

    own = []
    for i in range(len(tokens)):
        seq = torch.cat([prompt, torch.tensor(tokens[:i], dtype=torch.long)])[None]
        own.append(int(llama(input_ids=seq).logits[0, -1].argmax()))
    return own, state_after


def test_greedy_view_shows_the_response_and_each_decision(llama, strict, prompts, make_mara):
    ids, mask = prompts
    mara = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="first", chunk_size=1, trace=True)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         eos_token_id=EOS, logits_processor=[mara])
    tok = MarkupTokenizer()
    view = mara.stats.view(tok)
    assert len(view) == 3
    steered_total = 0
    for r, row in enumerate(view.rows):
        tokens = until_eos(new_tokens(out, ids)[r])
        assert [p.token for p in row.positions] == tokens
        assert row.text == tok.decode(tokens) and row.ended == (EOS in new_tokens(out, ids)[r])
        own, state_after = own_choice_and_states(llama, ids, mask, r, tokens)
        # steered exactly where the emitted token is not the LLM's own greedy choice
        assert row.steered == [i for i, (t, o) in enumerate(zip(tokens, own)) if t != o]
        steered_total += len(row.steered)
        for i, p in enumerate(row.positions):
            if not p.decided:
                continue
            assert p.candidates[0].token == own[i] and p.candidates[p.chosen].token == p.token
            for k, c in enumerate(p.candidates):
                # the serial early stop judges up to the emitted one; after it, only what a batched chunk or the
                # lookahead scored for another row, and an unjudged candidate says so
                assert (c.p_accept is None) == (c.accepted is None) and (c.p_accept is not None or k > p.chosen)
                if c.p_accept is None:
                    continue
                with torch.no_grad():
                    expected = float(strict(state_after(tokens[:i], c.token)[None]).accept_prob)
                assert c.p_accept == pytest.approx(expected, abs=1e-4)
                assert c.accepted == (expected > 0.5)
            assert [c.token for c in p.rejected] == [c.token for c in p.candidates[:p.chosen]] or p.fallback
    assert steered_total > 0


def test_text_and_html_render_every_row_escaped_and_self_contained(llama, strict, prompts, make_mara):
    ids, mask = prompts
    mara = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, logits_processor=[mara])
    view = mara.stats.view(MarkupTokenizer(), prompts=["first <b>prompt</b>", "second", "third"])
    plain, coloured = view.text(color=False), view.text(color=True)
    assert "\033[" not in plain and "\033[" in coloured
    assert str(view) == plain  # pytest's captured stdout is not a terminal
    assert [line for line in plain.splitlines() if line.startswith("Row ")] == [
        f"Row {r} {label!r}: {row.summary()}" for r, (label, row) in
        enumerate(zip(["first <b>prompt</b>", "second", "third"], view.rows))]
    steered = [p for row in view.rows for p in row.positions if p.steered]
    assert steered and all(f'→ "{p.text}"' in plain for p in steered)
    html = view._repr_html_()
    assert "<script" not in html and "<b>prompt" not in html
    assert "&lt;script&gt;" in html and "&lt;b&gt;prompt" in html
    assert "src=" not in html and "href=" not in html and "@import" not in html and "url(" not in html
    assert html.count('class="mv-row"') == 3
    assert html.count(' mv-first"') == 1 + sum(bool(row.steered) for row in view.rows)  # the legend's and each row's
    one = view[1]
    assert one.rows == [view.rows[1]] and one.text(color=False).startswith("Row 1 'second'")


def test_sampled_calls_and_both_routes_show_what_was_generated(llama, strict, prompts, make_mara):
    ids, mask = prompts
    mara = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    tok = MarkupTokenizer()
    for route in ({"logits_processor": [mara]}, {"custom_generate": mara.custom_generate}):
        for sample in (False, True):
            torch.manual_seed(0)
            out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=sample,
                                 eos_token_id=EOS, **route)
            view = mara.stats.view(tok)
            for r, row in enumerate(view.rows):
                assert [p.token for p in row.positions] == until_eos(new_tokens(out, ids)[r])
                for p in row.positions:
                    if p.decided:  # the emitted candidate was judged and, unless every one was rejected, accepted
                        chosen = p.candidates[p.chosen]
                        assert chosen.p_accept is not None and chosen.accepted == (not p.fallback)


def test_the_trace_marks_unjudged_candidates_as_none(llama, strict, prompts, make_mara):
    ids, mask = prompts
    lazy = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", trace=True, chunk_size=1)
    every = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", trace=True, greedy_generate=False)
    outs = [llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                           logits_processor=[m]) for m in (lazy, every)]
    assert torch.equal(*outs)
    unjudged = 0
    for mine, full in zip(lazy.stats.trace, every.stats.trace):
        assert (mine["row"], mine["step"], mine["candidates"]) == (full["row"], full["step"], full["candidates"])
        assert None not in full["p_accept"]
        for p, q in zip(mine["p_accept"], full["p_accept"]):
            assert p is None or p == pytest.approx(q, abs=1e-5)
        unjudged += mine["p_accept"].count(None)
    assert unjudged > 0


def test_no_view_without_trace_and_none_for_beams(llama, strict, prompts, make_mara):
    ids, mask = prompts
    plain = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P)
    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, logits_processor=[plain])
    assert plain.stats.tokens == [] and plain.stats.trace == []  # nothing is kept per step without trace=True
    with pytest.raises(ValueError, match="trace=True"):
        plain.stats.view(MarkupTokenizer())
    traced = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    with pytest.raises(ValueError, match="generate with this processor first"):
        traced.stats.view(MarkupTokenizer())
    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, logits_processor=[traced])
    with pytest.raises(ValueError, match="beam search"):
        traced.stats.view(MarkupTokenizer())
    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, logits_processor=[traced])
    with pytest.raises(ValueError, match="1 prompts given for a call of 3 rows"):
        traced.stats.view(MarkupTokenizer(), prompts=["only one"])
    assert isinstance(traced.stats.view(MarkupTokenizer()), DecisionView)


def test_the_output_given_makes_the_view_exact_where_generate_chose_among_several(llama, strict, prompts, make_mara):
    """Judging every candidate while sampling, generate draws among the accepted ones itself: the processor never
    sees the last step's token, the output does."""
    ids, mask = prompts
    mara = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, strategy="veto", greedy_generate=False, trace=True)
    torch.manual_seed(3)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, eos_token_id=EOS,
                         logits_processor=[mara])
    view = mara.stats.view(MarkupTokenizer(), sequences=out)
    for r, row in enumerate(view.rows):
        tokens = until_eos(new_tokens(out, ids)[r])
        assert [p.token for p in row.positions] == tokens
        for p in row.positions:  # every emitted token was a candidate that the agent accepted (or all were rejected)
            if p.decided:
                assert p.candidates[p.chosen].token == p.token and p.candidates[p.chosen].accepted != p.fallback
    with pytest.raises(ValueError, match="not the output of the traced call"):
        mara.stats.view(MarkupTokenizer(), sequences=out[:1])


class ControlTokenizer:
    """A stand-in tokenizer whose tokens decode to what a terminal acts on instead of showing: an ANSI escape
    sequence, a carriage return, a right-to-left override, a zero-width space, a line separator, and a bell."""

    eos_token_id = EOS
    HIDDEN = ["\x1b[2J\x1b[31m", "\r", "\u202e", "\u200b", "\u2028", "\x07"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"{self.HIDDEN[i % len(self.HIDDEN)]}t{i}\n" if i % 3 == 0 else f"t{i} " for i in ids)


def test_the_terminal_view_escapes_control_and_format_characters(llama, strict, prompts, make_mara):
    """Model text reaches the terminal only as visible characters: every control or format character of the
    response, the candidates and the labels is written as an escape (as the HTML view escapes markup); the response's
    own line breaks stay."""
    import unicodedata

    ids, mask = prompts
    mara = make_mara(strict, llama, top_k=TOP_K, top_p=TOP_P, trace=True)
    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, logits_processor=[mara])
    view = mara.stats.view(ControlTokenizer(), prompts=["a \u202eprompt", "b\x1b[0m", "c"])
    for color in (False, True):
        text = view.text(color=color)
        if color:  # the view's own colours are the only escape sequences
            for style in ("\033[0m", "\033[1m", "\033[2m", "\033[9m", "\033[31m", "\033[32m", "\033[33m"):
                text = text.replace(style, "")
        hidden = {ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")}
        assert not hidden, hidden
    plain = view.text(color=False)
    assert "\\x1b[2J" in plain and "\\u202e" in plain  # written out where they were, so they can be seen
    assert plain.count("\n") > len(view.rows)  # the responses' line breaks are kept
