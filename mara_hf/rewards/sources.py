"""Reward sources for MARA's terminal reward: sum over sources of multiplier x score(prompt, response).

A source is given as a spec string `SOURCE[*MULTIPLIER]` (see `parse_reward_spec`):

    refusal                                  built-in: +1 / -1 for refusing harmful / answering benign prompts
    refusal-held                             built-in: the same, but a harmful request counts as refused only when
                                             the refusal holds (nothing of what was asked follows it)
    repetition*0.5                           built-in: minus the number of repeated 4-grams (loops cost)
    my_pkg.rewards:score*-1                  a Python function fn(prompts, responses) -> list[float]
    PKU-Alignment/beaver-7b-v1.0-cost*-1     a Hugging Face sequence-classification reward model (Hub id)
    ./my_rm_folder*0.5                       ... or a local folder
    guard:meta-llama/Llama-Guard-3-1B        a generative safety judge (Hub id or folder): P(safe verdict) in [0, 1]

The `guard:` prefix is reserved: `guard:X` always names a guard model `X` (a Hub id or local folder), never the
function `X` of a module called `guard`. A guard model (`GuardReward`) is an `AutoModelForCausalLM` in the
Llama Guard style that judges the conversation through its own chat template and answers "safe" or "unsafe";
the score is how likely it answers safe rather than unsafe. Its verdict texts (`safe_text`, `unsafe_text`,
`verdict_prefix`) are set from Python: `GuardReward(id, verdict_prefix="\\n\\n")` (what Llama Guard 3 needs), or
as the module:function source `my_guards:judge` for such an object `judge` from the command line.

Sources receive the raw prompt texts (not chat-formatted) and the response texts, and return unmultiplied
scores; `combine` applies the multipliers. Parsing is cheap (no model is loaded), so a trainer can validate
every spec before loading its LLM; `RewardSource.check()` goes one step further (e.g. reads a model's config).
"""

import importlib
import inspect
import math
import os
import re
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from ..evaluation.metrics import repeated_ngrams
from .refusal import is_refusal, refusal_holds

logger = logging.get_logger(__name__)

DEFAULT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: {response}"
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_ACCEPTED_FORMS = ("a built-in name ({builtins}), module:function (an importable Python function "
                   "fn(prompts, responses) -> list[float]), a local reward model folder, a Hub reward model "
                   "id org/name, or guard:<Hub id or folder> for a generative safety judge (Llama Guard style); "
                   "each optionally followed by *MULTIPLIER, e.g. refusal*2 or org/rm*-0.5")
GUARD_PREFIX = "guard:"
GUARD_OPTIONS = ("verdict_prefix", "safe_text", "unsafe_text")
_GENERATIVE = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")  # LMHeadModel: GPT-2 and its kin


class RewardSource:
    """One reward: `source(prompts, responses, records)` -> one unmultiplied, finite score per response."""

    def __init__(self, name: str, multiplier: float = 1.0):
        self.name = name
        self.multiplier = float(multiplier)

    def score(self, prompts: list[str], responses: list[str], records: list[dict] | None) -> list[float]:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap validation before any heavy loading (reading configs, not weights). Raises on problems."""

    def __call__(self, prompts: list[str], responses: list[str], records: list[dict] | None = None) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"Reward {self.name!r}: got {len(prompts)} prompts but {len(responses)} responses")
        if records is not None and len(records) != len(prompts):
            raise ValueError(f"Reward {self.name!r}: got {len(records)} records for {len(prompts)} prompts")
        scores = list(self.score(list(prompts), list(responses), records))
        if len(scores) != len(responses):
            raise ValueError(f"Reward {self.name!r} returned {len(scores)} scores for {len(responses)} responses")
        result = []
        for index, value in enumerate(scores):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Reward {self.name!r} returned a non-number at index {index}: "
                                 f"{value!r:.80}") from None
            if not math.isfinite(value):
                raise ValueError(f"Reward {self.name!r} returned {value} at index {index}; scores must be finite")
            result.append(value)
        return result

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, multiplier={self.multiplier:g})"


class CallableReward(RewardSource):
    """Wraps `fn(prompts, responses) -> list[float]`; `fn` also gets `records=` when it accepts that argument."""

    def __init__(self, fn: Callable, name: str | None = None, multiplier: float = 1.0):
        if not callable(fn):
            raise ValueError(f"Reward {name or fn!r} is not callable")
        super().__init__(name or getattr(fn, "__qualname__", repr(fn)), multiplier)
        self.fn = fn
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # some builtins have no signature
            params = ()
        self._takes_records = any(p.name == "records" or p.kind is p.VAR_KEYWORD for p in params)

    def score(self, prompts, responses, records):
        if self._takes_records:
            return self.fn(prompts, responses, records=records)
        return self.fn(prompts, responses)


class RefusalReward(RewardSource):
    """Built-in `refusal`: rewards refusing harmful requests and answering benign ones.

    Each prompt record must say whether the request is harmful: a boolean `harmful` field, or a `source`
    field as in the HH-RLHF prompt sets (`harmless-base` / `red-team-attempts` = harmful red-team request,
    `helpful-*` = benign). Score: +1 if a harmful request is refused or a benign one answered, else -1
    (refusals judged by `mara_hf.refusal.is_refusal`).
    """

    def __init__(self, multiplier: float = 1.0, name: str = "refusal"):
        super().__init__(name, multiplier)

    @staticmethod
    def is_harmful(record: dict | None, index: int = 0) -> bool:
        if isinstance(record, dict) and "harmful" in record:
            if not isinstance(record["harmful"], bool):
                raise ValueError(f"Prompt {index}: field 'harmful' must be true or false, got {record['harmful']!r}")
            return record["harmful"]
        source = record.get("source") if isinstance(record, dict) else None
        if isinstance(source, str) and source.startswith(("harmless", "red-team")):
            return True
        if isinstance(source, str) and source.startswith("helpful"):
            return False
        if source is not None:
            raise ValueError(f"Prompt {index}: unknown source {source!r} for the refusal reward (expected "
                             f"harmless-base / red-team-attempts or helpful-*); or give a boolean 'harmful' field")
        raise ValueError(f"The refusal reward needs to know which prompts are harmful: prompt {index} has no "
                         f"'source' (harmless-base / helpful-base, as in HH-RLHF) or boolean 'harmful' field")

    def score(self, prompts, responses, records):
        if records is None:
            raise ValueError("The refusal reward needs the prompt records, with a 'source' (harmless-base / "
                             "helpful-base, as in HH-RLHF) or boolean 'harmful' field")
        return [1.0 if is_refusal(response) == self.is_harmful(record, index) else -1.0
                for index, (response, record) in enumerate(zip(responses, records))]


class HeldRefusalReward(RefusalReward):
    """Built-in `refusal-held`: `refusal`'s labels and scores, but a harmful request counts as refused only when
    the refusal holds (`mara_hf.refusal.refusal_holds`: it opens with a refusal and nothing of what was asked
    follows). A benign prompt counts as answered when the response does not open with a refusal.

    Score: +1 for a held refusal of a harmful request or an answer to a benign one, else -1. With prefix shaping
    (the default) the token that takes a refusal back ("... but here's how") is charged the 2 points it costs.
    """

    def __init__(self, multiplier: float = 1.0, name: str = "refusal-held"):
        super().__init__(multiplier, name)

    def score(self, prompts, responses, records):
        if records is None:
            raise ValueError("The refusal-held reward needs the prompt records, with a 'source' (harmless-base / "
                             "helpful-base, as in HH-RLHF) or boolean 'harmful' field")
        return [(1.0 if refusal_holds(response) else -1.0) if self.is_harmful(record, index)
                else (-1.0 if is_refusal(response) else 1.0)
                for index, (response, record) in enumerate(zip(responses, records))]


class RepetitionReward(RewardSource):
    """Built-in `repetition`: minus the number of the response's 4-grams that already occurred earlier in it.

    Units are words and punctuation marks (`WORD_UNITS`), close to tokens for English, so that the score follows
    the repeated 4-grams `mara-hf eval` reports without needing the LLM's tokenizer. Score 0 for a response with
    no loop; a phrase said twice costs one point per repeated 4-gram. With prefix shaping (the default) each token
    that completes a repeated 4-gram is charged for it, so the agent learns where loops start. Give it a positive
    multiplier (`repetition*0.5`): the score is already negative.
    """

    def __init__(self, multiplier: float = 1.0, name: str = "repetition", n: int = 4):
        super().__init__(name, multiplier)
        self.n = n

    def score(self, prompts, responses, records):
        return [float(-repeated_ngrams(WORD_UNITS.findall(response), self.n)[0]) for response in responses]


WORD_UNITS = re.compile(r"\w+|[^\w\s]")
BUILTINS: dict[str, type[RewardSource]] = {"refusal": RefusalReward, "refusal-held": HeldRefusalReward,
                                           "repetition": RepetitionReward}


class HFRewardModel(RewardSource):
    """A Hugging Face `AutoModelForSequenceClassification` reward model, loaded on first use.

    Each (prompt, response) pair is formatted with the tokenizer's chat template as a user / assistant
    conversation (when it has one and `use_chat_template`), else with `template` (`{prompt}`, `{response}`,
    default `DEFAULT_TEMPLATE`, the HH-RLHF format). The score is the single logit (num_labels == 1) or the
    logit at `label_index` (required when num_labels > 1). Inputs longer than the model's max length are
    truncated on the tokenizer's truncation side.
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
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, dtype=self.dtype, output_loading_info=True)
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
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model scores for one pair."""
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return self.template.format(prompt=prompt, response=response)

    def score(self, prompts, responses, records):
        self.load()
        # Chat templates write their own special tokens (BOS...); plain templates get the tokenizer's.
        chat = self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        max_length = _max_length(self.tokenizer, self.model)
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=max_length is not None, max_length=max_length,
                                   add_special_tokens=not chat).to(self.model.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            column = 0 if logits.shape[-1] == 1 else self.label_index
            scores += logits[:, column].float().cpu().tolist()
        return scores



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
        model, info = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=self.dtype,
                                                           output_loading_info=True)
        self._check_config(model.config)
        # Weights that the checkpoint lacks (e.g. the LM head of a classifier) would be random: refuse them.
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])[:5]
            raise ValueError(f"Guard model {self.name!r} lacks trained weights for {missing}; "
                             f"it is not a generative (causal LM) checkpoint")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
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



def _max_length(tokenizer, model) -> int | None:
    """The longest input the model reads: model_max_length is a huge sentinel when the tokenizer does not know it,
    so fall back on the config."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 1_000_000:
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit


def parse_reward_spec(spec: str, **model_kwargs) -> RewardSource:
    """Build a reward source from `SOURCE[*MULTIPLIER]` without loading any model.

    `model_kwargs` (batch_size, device, dtype, template, label_index, ...) go to `HFRewardModel`; `GuardReward`
    (`guard:` specs) takes batch_size, device and dtype from them and ignores the others, as do the other sources.
    `GUARD_OPTIONS` (verdict_prefix, safe_text, unsafe_text) go to guard sources only.
    """
    text = spec.strip()
    source, multiplier = text, 1.0
    if "*" in text:
        source, _, factor = text.rpartition("*")
        source = source.strip()
        try:
            multiplier = float(factor)
        except ValueError:
            raise ValueError(f"Reward spec {spec!r}: multiplier {factor.strip()!r} is not a number") from None
        if not math.isfinite(multiplier):
            raise ValueError(f"Reward spec {spec!r}: the multiplier must be finite")
    if not source:
        raise ValueError(f"Reward spec {spec!r} names no source; give {_accepted()}")
    # the guard's verdict settings are for guard sources only
    guard_kwargs = {k: model_kwargs.pop(k) for k in GUARD_OPTIONS if k in model_kwargs}
    if source.startswith(GUARD_PREFIX):  # before module:function, which `guard:folder` would look like
        return _guard_source(spec, source[len(GUARD_PREFIX):].strip(), multiplier, {**model_kwargs, **guard_kwargs})
    if source in BUILTINS:
        return BUILTINS[source](multiplier=multiplier)
    if _CALLABLE.match(source):
        return CallableReward(_import_function(source), name=source, multiplier=multiplier)
    location = _model_location(source, "Reward")
    if location is None:
        raise ValueError(f"Unknown reward source {source!r}; give {_accepted()}")
    return HFRewardModel(location, multiplier=multiplier, **model_kwargs)


def combine(sources: list[RewardSource], prompts: list[str], responses: list[str],
            records: list[dict] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Score with every source: (total = sum of multiplier x score per response, {name: unmultiplied scores})."""
    if not sources:
        raise ValueError("combine needs at least one reward source")
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Reward source names must be unique, got {names}")
    per_source = {source.name: source(prompts, responses, records) for source in sources}
    total = [0.0] * len(responses)
    for source in sources:
        total = [t + source.multiplier * s for t, s in zip(total, per_source[source.name])]
    return total, per_source


def _guard_source(spec: str, target: str, multiplier: float, model_kwargs: dict) -> "GuardReward":
    if not target:
        raise ValueError(f"Reward spec {spec!r} names no guard model; give {GUARD_PREFIX}<Hub id or local folder>")
    location = _model_location(target, "Guard")
    if location is None:
        raise ValueError(f"Guard model {target!r} is neither a local folder nor a Hub id org/name")
    return GuardReward(location, multiplier=multiplier, name=GUARD_PREFIX + target, **model_kwargs)


def _model_location(source: str, kind: str) -> str | None:
    """A model given as a local folder (its expanded path) or a Hub id (as given); None when it is neither. Short
    errors for a folder without config.json, a file, or a path that does not exist. `kind`: "Reward" or "Guard"."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{kind} model folder {source!r} has no config.json")
        return path
    if os.path.exists(path):
        raise ValueError(f"{kind} source {source!r} is a file; a {kind.lower()} model is given as its folder")
    if source.startswith((".", "/", "~")) or "\\" in source:  # clearly a path, not a Hub id
        raise ValueError(f"{kind} model folder {source!r} not found")
    return source if _HUB_ID.match(source) else None


def _accepted() -> str:
    return _ACCEPTED_FORMS.format(builtins=", ".join(sorted(BUILTINS)))


def _import_function(source: str) -> Callable:
    module_name, _, attribute = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing *target* module is the spec's fault; a missing dependency inside it is re-raised.
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise ValueError(f"Reward {source!r}: module {module_name!r} not found (install it or add its folder "
                         f"to PYTHONPATH)") from None
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"Reward {source!r}: {module_name!r} has no attribute {attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"Reward {source!r}: {attribute!r} is a {type(fn).__name__}, not a function")
    return fn
