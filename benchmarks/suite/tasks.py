"""The tiny-model tasks of the training suite: a random tiny llama (word-level vocabulary "t0" ... "t63"), a reward
of one of several families, and the best agent for it, computed.

Families (each a reward on the response's token ids):

    share3     share of tokens whose id is a multiple of 3 (dense: a third of the vocabulary)
    share7     share of tokens whose id is a multiple of 7 (sparse: a seventh)
    banned     minus the share of tokens in the lower half of the vocabulary (a banned set of half of it)
    bigram     minus the share of adjacent pairs whose ids sum to a multiple of 4 (a banned n-gram family)
    even_pos   share of the even positions (0, 2, ...) that hold an even id (a positional pattern)
    ending     1 when the response's last token is a multiple of 5, else 0 (paid on the whole response, at its end)
    quota      1 when at least half of the response's tokens are odd, else 0 (paid only on the whole response)
    distinct   share of distinct tokens in the response (the LLM's loops are what to avoid)

Each task is a family on an LLM seed, "flat" (the random init's nearly uniform next-token distributions) or
"peaked" (the LM head re-drawn larger, so the LLM is confident, as real LLMs are at most steps). Its best agent
(`oracle`) decodes each prompt serially and, at each step, emits the most probable candidate (top-k) the family's
rule wants there, the top candidate when none is: a veto agent that rejects exactly what the reward pays against.
For the per-token families it is the best veto agent under greedy decoding; for `ending` and `quota` it meets the
condition whenever a candidate allows it.

Settings are chosen on the `TUNE` tasks and reported on the `HELD_OUT` ones.
"""

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB, HIDDEN = 64, 32
PAD, EOS, BOS = 0, 1, 2
FIRST_PROMPT_ID = 3


def ids_of(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split() if word[:1] == "t"]


def _share(ids, keep):
    return sum(map(keep, ids)) / max(len(ids), 1)


def _bigram(ids):
    pairs = list(zip(ids, ids[1:]))
    return -sum((a + b) % 4 == 0 for a, b in pairs) / max(len(pairs), 1)


def _quota(ids):
    return float(len(ids) > 0 and sum(i % 2 for i in ids) >= len(ids) / 2)


# family -> (reward on the response's ids, the oracle's rule: does it want token t after `prefix`, at the response's
# step `step` of `steps`)
FAMILIES = {
    "share3": (lambda ids: _share(ids, lambda i: i % 3 == 0), lambda t, prefix, step, steps: t % 3 == 0),
    "share7": (lambda ids: _share(ids, lambda i: i % 7 == 0), lambda t, prefix, step, steps: t % 7 == 0),
    "banned": (lambda ids: -_share(ids, lambda i: i < VOCAB // 2 and i != EOS),
               lambda t, prefix, step, steps: t >= VOCAB // 2),
    "bigram": (_bigram, lambda t, prefix, step, steps: not prefix or (prefix[-1] + t) % 4 != 0),
    "even_pos": (lambda ids: _share([i for k, i in enumerate(ids) if k % 2 == 0], lambda i: i % 2 == 0),
                 lambda t, prefix, step, steps: step % 2 == 1 or t % 2 == 0),
    "ending": (lambda ids: float(bool(ids) and ids[-1] % 5 == 0),
               lambda t, prefix, step, steps: step < steps - 1 or t % 5 == 0),
    "quota": (_quota, lambda t, prefix, step, steps: t % 2 == 1),
    "distinct": (lambda ids: len(set(ids)) / max(len(ids), 1), lambda t, prefix, step, steps: t not in prefix),
}


@dataclass(frozen=True)
class Task:
    """A family's reward on one tiny LLM."""

    family: str
    seed: int
    peaked: bool

    @property
    def name(self) -> str:
        return f"{self.family}/{'peaked' if self.peaked else 'flat'}-{self.seed}"

    def reward(self, prompts, responses) -> list[float]:
        """The family's reward of each response (texts "t<i> t<j> ...")."""
        score = FAMILIES[self.family][0]
        return [float(score(ids_of(r))) for r in responses]

    def model(self):
        return tiny_llm(self.seed, self.peaked)


# chosen on: TUNE; reported on: HELD_OUT (families and LLMs apart, so a setting cannot fit a reported task)
TUNE = [Task("share3", 0, False), Task("banned", 1, True), Task("even_pos", 2, False), Task("ending", 3, True)]
HELD_OUT = [Task("share7", 4, False), Task("bigram", 5, True), Task("quota", 6, False), Task("distinct", 7, True),
            Task("share3", 8, True), Task("banned", 9, False)]
QUICK = [HELD_OUT[0], HELD_OUT[1]]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: token i is the word "t<i>", but pad (0) is "<pad>" and eos (1) "</s>" (special tokens are matched
    inside words before splitting: an eos named "t1" would cut "t17" in two)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"<pad>": PAD, "</s>": EOS})
    del vocab[f"t{PAD}"], vocab[f"t{EOS}"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def tiny_llm(seed: int, peaked: bool) -> LlamaForCausalLM:
    """A 2-layer random llama (vocab 64). Peaked: the LM head re-drawn with std 3 / sqrt(hidden), so most steps have
    a few likely tokens; flat: the random init (nearly uniform)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    model = LlamaForCausalLM(config).eval()
    if peaked:
        head = model.get_output_embeddings()
        generator = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 3.0 / HIDDEN ** 0.5)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.name_or_path = f"tiny-llama-{'peaked' if peaked else 'flat'}-{seed}"
    return model


def prompts(n: int, seed: int, length: int = 6) -> list[dict]:
    """`n` records {"prompt": "t40 t57 ..."} of ids from FIRST_PROMPT_ID up."""
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt": " ".join(f"t{int(i)}" for i in torch.randint(FIRST_PROMPT_ID, VOCAB, (length,),
                                                                      generator=generator))} for _ in range(n)]


@torch.no_grad()
def oracle(task: Task, model, tokenizer, records, max_new_tokens: int, top_k: int) -> float:
    """Mean reward of the task's best agent on `records` (see the module docstring), decoded serially."""
    from mara_hf.decoding.candidates import candidate_set

    wants, total = FAMILIES[task.family][1], 0.0
    for record in records:
        ids, emitted = tokenizer(record["prompt"], return_tensors="pt")["input_ids"], []
        for step in range(max_new_tokens):
            cands = candidate_set(model(ids).logits[:, -1], top_k, 1.0)
            tokens = cands.ids[0, :int(cands.counts[0])].tolist()
            token = next((t for t in tokens if t != EOS and wants(t, emitted, step, max_new_tokens)), tokens[0])
            if token == EOS:
                break
            emitted.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        total += task.reward(None, [" ".join(f"t{t}" for t in emitted)])[0]
    return total / len(records)
