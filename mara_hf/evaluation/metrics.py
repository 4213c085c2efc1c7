"""What a response costs, measured under the base model itself (nats):

- `response_nll`: the negative log-likelihood of each response's tokens, summed per response with the token count
  (means are taken per token). MARA can only move the base model's text away from what it finds likely; this says
  how far, in the units of the model's own loss.
- `response_measures`: the same, and the divergence a veto agent's decisions cost along the response: at each token,
  -log(1 - m), where m is the base model's probability (temperature 1) of the tokens it ranks above the emitted one.
  Greedy MARA emits a lower-ranked token only after the agent rejected every token above it, so m is the mass the
  agent removed there, and -log(1 - m) the KL that removal causes to the LLM's distribution (MARA's sampling draws
  from the LLM's distribution restricted to what the agent accepts: KL(q_A || q) = -log q(A) >= -log(1 - m)). The
  LLM's own greedy answer costs 0.

Repetition (`repeated_ngrams`, how many of a response's n-grams already occurred earlier in it) lives with the
repetition reward in `rewards.builtin`.
"""

import torch

from ..utils import token_ids


def response_lengths(new_tokens: torch.Tensor, eos) -> torch.Tensor:
    """Generated tokens per row of `new_tokens` (generate's new tokens), up to and including the first EOS."""
    eos = torch.tensor(token_ids(eos) or [-1], device=new_tokens.device)
    is_eos = torch.isin(new_tokens, eos)
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, new_tokens.shape[1])


@torch.no_grad()
def response_measures(model, sequences: torch.LongTensor, prompt_mask: torch.Tensor, lengths: torch.LongTensor,
                      chunk_size: int = 16) -> dict:
    """Per row, as lists: `nll` (summed NLL of the response tokens), `tokens` (their number) and `divergence` (summed
    -log(1 - m) over them; see the module docstring).

    `sequences` are generate's outputs (left-padded prompt of width `prompt_mask.shape[1]`, then the new tokens);
    `lengths` the number of real new tokens per row (up to and including EOS); later positions are padding. Rows
    go through the model `chunk_size` at a time (the logits of a long batch over a large vocabulary are large).
    """
    out = {"nll": [], "tokens": [], "divergence": []}
    for start in range(0, sequences.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        part = _measures(model, sequences[rows], prompt_mask[rows], lengths[rows])
        for key in out:
            out[key] += part[key]
    return out


def _measures(model, sequences, prompt_mask, lengths) -> dict:
    width = prompt_mask.shape[1]
    steps = torch.arange(sequences.shape[1] - width, device=sequences.device)
    new_mask = (steps[None] < lengths[:, None].to(sequences.device)).to(prompt_mask.dtype)
    mask = torch.cat([prompt_mask, new_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
    # the token at position t is predicted by the logits at t - 1
    logprobs = torch.log_softmax(logits[:, width - 1:-1].float(), dim=-1)
    del logits
    token_lp = logprobs.gather(-1, sequences[:, width:, None])
    probs = logprobs.exp_()  # in place: the log-probabilities are not needed past this point
    above = (probs * (probs > token_lp.exp())).sum(-1)
    # 1 - m >= q(emitted) > 0; clamped there so that rounding never takes the log of zero or less
    left = (1 - above).clamp(min=token_lp.squeeze(-1).exp().clamp(min=1e-30))
    real = new_mask.to(torch.float32)
    return {"nll": (-(token_lp.squeeze(-1) * real).sum(-1)).tolist(), "tokens": new_mask.sum(-1).long().tolist(),
            "divergence": ((-left.log()) * real).sum(-1).tolist()}


def response_nll(model, sequences: torch.LongTensor, prompt_mask: torch.Tensor, lengths: torch.LongTensor):
    """Per row: (summed NLL of the response tokens, number of response tokens), as two lists (see
    `response_measures`)."""
    out = response_measures(model, sequences, prompt_mask, lengths)
    return out["nll"], out["tokens"]
