"""One prompt encoder for every command: the token ids MARA decodes from, decided in one place.

A prompt becomes a user turn in the tokenizer's chat template when it has one (the template writes the special
tokens it wants, so none are added), and stays plain text otherwise, with the tokenizer's own special tokens (a
BOS token where the tokenizer adds one), exactly as `tokenizer(text)` encodes it. Batches are left-padded, as
decoder-only generation needs. The caller's tokenizer is never changed (no `padding_side` or `pad_token` set).
"""

import torch
from transformers.utils import logging

# A conversational prompt (TRL's format: a list of {"role", "content"} messages) keeps its messages in its record
# under this key, so that a TRL reward function gets them as TRL passes them (`rewards.base.CallableReward`).
CONVERSATION = "prompt_messages"

logger = logging.get_logger(__name__)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompts(tokenizer, prompts: list[str], system_prompt: str | None = None) -> list[str]:
    """Each prompt as a user turn in the tokenizer's chat template, ready for generation; unchanged without one."""
    if not has_chat_template(tokenizer):
        if system_prompt:
            logger.warning("The tokenizer has no chat template: system_prompt is ignored.")
        return list(prompts)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [tokenizer.apply_chat_template(head + [{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True) for prompt in prompts]


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def encode_prompts(tokenizer, prompts: list[str], system_prompt: str | None = None, device=None) -> dict:
    """`{"input_ids", "attention_mask"}` of the prompts as MARA decodes them (see the module docstring), left-padded
    with `pad_id(tokenizer)`, on `device`."""
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts.")
    texts = format_prompts(tokenizer, prompts, system_prompt)
    rows = tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
