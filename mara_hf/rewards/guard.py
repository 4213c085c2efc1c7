"""Guard models: a generative safety judge (Llama Guard style) scores a response by P(safe verdict)."""

import inspect

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

from ..models import resolve_device, resolve_dtype
from .base import RewardSource
from .models import _max_length

GUARD_PREFIX = "guard:"
GUARD_OPTIONS = ("verdict_prefix", "safe_text", "unsafe_text")
_GENERATIVE = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")  # LMHeadModel: GPT-2 and its kin


class GuardReward(RewardSource):
    """A generative safety judge in the Llama Guard style (an `AutoModelForCausalLM`), loaded on first use.

    Each (prompt, response) pair is written as a user / assistant conversation through the judge's own chat
    template (`add_generation_prompt=True`; Llama Guard's template ignores it and always ends with the header of
    the judge's answer), tokenised without adding special tokens. The score is the probability that the judge
    answers safe rather than unsafe, P(safe) / (P(safe) + P(unsafe)) in [0, 1], where P(v) is the probability of
    the tokens of `verdict_prefix + v` right after the formatted conversation (teacher-forced, the product over
    those tokens, computed in log space). The two verdicts are tokenised on their own, as the judge would write
    them. A higher score is safer: give the source a positive multiplier.

    `verdict_prefix` is what the judge writes before its verdict. Llama Guard 3 needs `verdict_prefix="\\n\\n"`: the
    chat templates of Llama-Guard-3-1B and -8B end at `<|start_header_id|>assistant<|end_header_id|>` with no
    newline, and the model then answers "\\n\\nsafe" or "\\n\\nunsafe\\nS1" (checked against those templates and
    published outputs of the model, not by running it here). With the default "" the verdict must follow the
    template directly.

    Message contents go to the template as plain strings; a template that only renders content parts
    (Llama-Guard-3-1B's reads `[{"type": "text", "text": ...}]` and drops plain strings) gets parts instead: the
    form is picked at load by rendering a probe conversation. The formatted conversation and verdict must fit
    the judge's max length (checked: nothing is truncated, since that would cut off the judge's instructions).
    """

    def __init__(self, name_or_path: str, multiplier: float = 1.0, safe_text: str = "safe",
                 unsafe_text: str = "unsafe", verdict_prefix: str = "", batch_size: int = 8, device=None,
                 dtype=None, name: str | None = None, template: str | None = None, label_index: int | None = None,
                 use_chat_template: bool = True):
        # template, label_index and use_chat_template are reward-model settings (`parse_reward_spec` passes the
        # same keyword arguments to every model source): a guard model always uses its own chat template.
        super().__init__(name or GUARD_PREFIX + name_or_path, multiplier)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for label, text in (("safe_text", safe_text), ("unsafe_text", unsafe_text)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{label} must be a non-empty string, got {text!r}")
        if not isinstance(verdict_prefix, str):
            raise ValueError(f"verdict_prefix must be a string, got {verdict_prefix!r}")
        self.name_or_path = name_or_path
        self.safe_text, self.unsafe_text, self.verdict_prefix = safe_text, unsafe_text, verdict_prefix
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.model = self.tokenizer = None
        self.verdict_ids: tuple[list[int], list[int]] | None = None
        self._content_form = "text"

    def check(self) -> None:
        """Read the config only: is it a generative (causal LM) model?"""
        self._check_config(AutoConfig.from_pretrained(self.name_or_path))

    def _check_config(self, config) -> None:
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any(a.endswith(_GENERATIVE) for a in architectures):
            raise ValueError(f"Guard model {self.name!r} is a {', '.join(architectures)}, not a generative "
                             f"...ForCausalLM / ...ForConditionalGeneration model; a sequence-classification "
                             f"reward model is given without the {GUARD_PREFIX} prefix")

    def load(self):
        """Load tokenizer and model (done on the first call); the tokenizer's checks come before the weights."""
        if self.model is not None:
            return
        self._load_tokenizer()
        logger.info(f"Loading guard model {self.name_or_path}")
        device = resolve_device(self.device)
        model, info = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=resolve_dtype(self.dtype, device),
                                                           output_loading_info=True)
        self._check_config(model.config)
        # Weights that the checkpoint lacks (e.g. the LM head of a classifier) would be random: refuse them.
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])[:5]
            raise ValueError(f"Guard model {self.name!r} lacks trained weights for {missing}; "
                             f"it is not a generative (causal LM) checkpoint")
        self.model = model.to(device).eval()

    def _load_tokenizer(self):
        """The tokenizer, its chat template, the verdicts' tokens and the form of message contents."""
        if self.tokenizer is not None:
            return
        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"Guard model {self.name!r} has no chat template: a guard model is judged through its "
                             f"own chat template; use a sequence-classification model as a plain reward model id "
                             f"(without {GUARD_PREFIX}) instead")
        safe, unsafe = (tokenizer(self.verdict_prefix + text, add_special_tokens=False)["input_ids"]
                        for text in (self.safe_text, self.unsafe_text))
        if safe == unsafe:
            raise ValueError(f"Guard model {self.name!r}: the safe and unsafe verdicts "
                             f"{self.verdict_prefix + self.safe_text!r} and {self.verdict_prefix + self.unsafe_text!r} "
                             f"are the same tokens {safe}; give safe_text and unsafe_text that the tokenizer "
                             f"tells apart")
        self._content_form = self._pick_content_form(tokenizer)
        self.tokenizer, self.verdict_ids = tokenizer, (safe, unsafe)

    def _render(self, prompt: str, response: str, form: str, tokenizer=None) -> str:
        if form == "parts":
            prompt, response = [{"type": "text", "text": prompt}], [{"type": "text", "text": response}]
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return (tokenizer or self.tokenizer).apply_chat_template(conversation, tokenize=False,
                                                                 add_generation_prompt=True)

    def _pick_content_form(self, tokenizer) -> str:
        probe = ("mara probe request", "mara probe answer")
        errors = []
        for form in ("text", "parts"):
            try:
                text = self._render(*probe, form, tokenizer)
            except Exception as e:  # a template that cannot take this form of content
                errors.append(f"{form}: {e}")
                continue
            if all(part in text for part in probe):
                return form
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise ValueError(f"Guard model {self.name!r}: its chat template does not show the conversation it is given, "
                         f"neither with plain-text nor with [{{'type': 'text'}}] message contents{detail}")

    def format(self, prompt: str, response: str) -> str:
        """The text the judge reads for one pair, up to where its verdict (after `verdict_prefix`) starts."""
        self._load_tokenizer()
        return self._render(prompt, response, self._content_form)

    def score(self, prompts, responses, records):
        if not responses:
            return []
        self.load()
        contexts = self.tokenizer([self.format(p, r) for p, r in zip(prompts, responses)],
                                  add_special_tokens=False)["input_ids"]
        scores = []
        for start in range(0, len(contexts), self.batch_size):
            logprobs = self._verdict_logprobs(contexts[start:start + self.batch_size])
            # P(safe) / (P(safe) + P(unsafe)) = sigmoid(log P(safe) - log P(unsafe))
            scores += torch.sigmoid(logprobs[:, 0] - logprobs[:, 1]).tolist()
        return scores

    @torch.inference_mode()
    def _verdict_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        """(len(contexts), 2) float64: log P(safe tokens), log P(unsafe tokens) after each context."""
        verdicts = self.verdict_ids
        rows = [context + verdict for context in contexts for verdict in verdicts]  # a pair's two rows side by side
        width = max(map(len, rows))
        limit = _max_length(self.tokenizer, self.model)
        if limit is not None and width > limit:
            raise ValueError(f"Guard model {self.name!r}: a formatted conversation with its verdict is {width} "
                             f"tokens, more than the judge's maximum of {limit}; shorten the prompts or responses")
        # Left padding puts every verdict at the end of its row, so only the last logits are needed; positions
        # count real tokens only, so that padding changes nothing.
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        device = self.model.device
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(map(len, verdicts)) + 1
        takes_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        kwargs = {"logits_to_keep": keep} if takes_keep else {}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                            **kwargs).logits[:, -keep:]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        result = torch.zeros(len(contexts), 2, dtype=torch.float64)
        for column, verdict in enumerate(verdicts):
            # the verdict's i-th token sits at width - len + i and is predicted by the logits one position earlier
            steps = torch.arange(keep - len(verdict) - 1, keep - 1, device=device)
            targets = torch.tensor(verdict, device=device)
            token_lp = logprobs[column::2, steps].gather(-1, targets[None, :, None].expand(len(contexts), -1, 1))
            result[:, column] = token_lp.squeeze(-1).double().sum(-1).cpu()
        return result
