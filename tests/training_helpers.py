"""Small, seeded pieces for the training tests: a tiny llama with a word-level tokenizer, a toy reward, prompts.

The task: half of the vocabulary (ids 2..33, `BANNED`) is "bad"; the reward of a response is minus the number of
banned tokens in it. Prompts only use the good half (ids 34..63). A random tiny LLM emits banned tokens about half
of the time, so an agent that learns to reject them earns a visibly higher reward within a few hundred episodes.
"""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import mara_hf

VOCAB = 64
HIDDEN = 32
PAD, EOS, BOS = 0, 1, 2
BANNED = frozenset(range(2, 34))  # half the vocabulary (BOS included: it is never a prompt token)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: token i is the word "t<i>"; pad t0, eos t1."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")


def tiny_model(seed: int = 0, hidden: int = HIDDEN) -> LlamaForCausalLM:
    """A 2-layer random llama (vocab 64), eos 1: greedy decoding mostly runs to max_new_tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def banned_count(text: str) -> int:
    return sum(int(word[1:]) in BANNED for word in text.split())


def avoid_banned(prompts, responses):
    """The toy reward: -(number of banned tokens in the response)."""
    return [-float(banned_count(r)) for r in responses]


def id_share(responses, keep) -> list[float]:
    """Per response ("t<i> t<j> ..."), the share of its tokens whose id `keep(id)` accepts: a dense per-token reward."""
    out = []
    for response in responses:
        ids = [int(word[1:]) for word in response.split()]
        out.append(sum(map(keep, ids)) / max(len(ids), 1))
    return out


def make_prompts(n: int, seed: int = 1, length: int = 6) -> list[dict]:
    """`n` records {"prompt": "t40 t57 ..."} of good tokens only."""
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt": " ".join(f"t{int(i)}" for i in torch.randint(34, VOCAB, (length,), generator=generator))}
            for _ in range(n)]


def mean_reward(tokenizer, sequences, prompt_len: int, reward=avoid_banned) -> float:
    texts = tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return sum(reward(None, texts)) / len(texts)


@torch.no_grad()
def evaluate(model, tokenizer, agent, records, max_new_tokens: int, top_k: int, reward=avoid_banned) -> tuple[float, float]:
    """(mean `reward` of base greedy decoding, mean `reward` of MARA decoding with `agent`) on `records`."""
    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in records], return_tensors="pt", padding=True)
    prompt_len = enc["input_ids"].shape[1]
    base = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    mara = mara_hf.MaraProcessor(agent, model=model, top_k=top_k)
    try:
        aligned = mara_hf.generate(model, mara, enc["input_ids"], enc["attention_mask"],
                                   max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD)
    finally:
        mara.remove()
    return mean_reward(tokenizer, base, prompt_len, reward), mean_reward(tokenizer, aligned, prompt_len, reward)


def save_tiny_model(folder) -> str:
    """The tiny llama and its tokenizer saved as a model folder, as `--model FOLDER` reads it."""
    tiny_model(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)
