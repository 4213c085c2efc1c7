"""Reward models: a Hugging Face sequence-classification model scores each (prompt, response) pair."""

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

from ..models import resolve_device, resolve_dtype
from .base import RewardSource

DEFAULT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: {response}"


class HFRewardModel(RewardSource):
    """A Hugging Face `AutoModelForSequenceClassification` reward model, loaded on first use.

    Each (prompt, response) pair is formatted with the tokenizer's chat template as a user / assistant
    conversation (when it has one and `use_chat_template`), else with `template` (`{prompt}`, `{response}`,
    default `DEFAULT_TEMPLATE`, the HH-RLHF format). The score is the single logit (num_labels == 1) or the
    logit at `label_index` (required when num_labels > 1). Inputs longer than the model's max length are
    truncated on the tokenizer's truncation side. `device` None or "auto": the first CUDA GPU when there is one,
    else the CPU; `dtype` None or "auto": bfloat16 there (float16 on older GPUs), float32 on a CPU.
    """

    def __init__(self, name_or_path: str, multiplier: float = 1.0, template: str | None = None,
                 use_chat_template: bool = True, batch_size: int = 8, device=None, dtype=None,
                 label_index: int | None = None, name: str | None = None):
        super().__init__(name or name_or_path, multiplier)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if template is not None and ("{prompt}" not in template or "{response}" not in template):
            raise ValueError(f"template must contain {{prompt}} and {{response}}, got {template!r}")
        self.name_or_path = name_or_path
        self.template = template or DEFAULT_TEMPLATE
        self.use_chat_template = use_chat_template
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.label_index = label_index
        self.model = self.tokenizer = None

    def check(self) -> None:
        """Read the config only: is it a sequence-classification model, and is the score logit defined?"""
        self._check_config(AutoConfig.from_pretrained(self.name_or_path))

    def _check_config(self, config) -> None:
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any("ForSequenceClassification" in a for a in architectures):
            raise ValueError(f"Reward model {self.name!r} is a {', '.join(architectures)}, not a transformers "
                             f"...ForSequenceClassification model; wrap it in a module:function reward instead")
        if config.num_labels > 1 and self.label_index is None:
            raise ValueError(f"Reward model {self.name!r} has {config.num_labels} labels {config.id2label}: "
                             f"pass label_index to pick the logit that is the reward")
        if self.label_index is not None and not -config.num_labels <= self.label_index < config.num_labels:
            raise ValueError(f"label_index {self.label_index} is out of range for reward model {self.name!r} "
                             f"with {config.num_labels} labels")

    def load(self):
        """Load tokenizer and model (done on the first call)."""
        if self.model is not None:
            return
        logger.info(f"Loading reward model {self.name_or_path}")
        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        device = resolve_device(self.device)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, dtype=resolve_dtype(self.dtype, device), output_loading_info=True)
        self._check_config(model.config)
        # A checkpoint without a trained head (a base LM, or another library's score head) would silently get
        # a random one: refuse it.
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])[:5]
            raise ValueError(f"Reward model {self.name!r} lacks trained weights for {missing}; "
                             f"it is not a sequence-classification checkpoint (wrap it in a module:function reward)")
        # Batching needs a pad token, and decoder models find each row's last real token by the config's pad id,
        # so that id must be the one the tokenizer pads with.
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.to(device).eval(), tokenizer

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model scores for one pair."""
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return self.template.format(prompt=prompt, response=response)

    def score(self, prompts, responses, records):
        logits = self.logits(prompts, responses)
        column = 0 if logits.shape[-1] == 1 else self.label_index
        return logits[:, column].tolist()

    def logits(self, prompts, responses) -> torch.Tensor:
        """The model's output `(n, num_labels)` (float32, on the CPU) for each (prompt, response) pair, as scored."""
        self.load()
        # Chat templates write their own special tokens (BOS...); plain templates get the tokenizer's.
        chat = self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        max_length = _max_length(self.tokenizer, self.model)
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=max_length is not None, max_length=max_length,
                                   add_special_tokens=not chat).to(self.model.device)
            with torch.inference_mode():
                out.append(self.model(**batch).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)


def _max_length(tokenizer, model) -> int | None:
    """The longest input the model reads: model_max_length is a huge sentinel when the tokenizer does not know it,
    so fall back on the config."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 1_000_000:
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit
