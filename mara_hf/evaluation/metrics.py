"""Fluency of a response, measured: `response_nll`, the negative log-likelihood of each response's tokens under the
base model itself (nats; summed per response, with the token count, so that means can be taken per token). MARA can
only move the base model's text away from what it finds likely; this says how far, in the units of the model's own
loss. Repetition (`repeated_ngrams`, how many of a response's n-grams already occurred earlier in it) lives with the
repetition reward in `rewards.builtin`.
"""

import torch


@torch.no_grad()
def response_nll(model, sequences: torch.LongTensor, prompt_mask: torch.Tensor, lengths: torch.LongTensor):
    """Per row: (summed NLL of the response tokens, number of response tokens), as two lists.

    `sequences` are generate's outputs (left-padded prompt of width `prompt_mask.shape[1]`, then the new tokens);
    `lengths` the number of real new tokens per row (up to and including EOS); later positions are padding.
    """
    width = prompt_mask.shape[1]
    steps = torch.arange(sequences.shape[1] - width, device=sequences.device)
    new_mask = (steps[None] < lengths[:, None].to(sequences.device)).to(prompt_mask.dtype)
    mask = torch.cat([prompt_mask, new_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
    # the token at position t is predicted by the logits at t - 1
    logprobs = torch.log_softmax(logits[:, width - 1:-1].float(), dim=-1)
    token_lp = logprobs.gather(-1, sequences[:, width:, None]).squeeze(-1)
    nll = -(token_lp * new_mask).sum(-1)
    return nll.tolist(), new_mask.sum(-1).long().tolist()
