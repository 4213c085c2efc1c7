"""Model cards for agents: rendered from model_cards/agent_card_template.md, merged into an existing card.

The generated part sits between two HTML-comment markers. Updating a card replaces only that part and
mara-hf's own metadata keys, so whatever a person wrote elsewhere in the card is kept, and writing the same
card twice gives the same file. The template's text after the markers (the paper's citation) is written once,
at the end, and is the person's from then on (added again only when it is missing).
"""

import os
import re
from importlib import metadata, resources

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from transformers.utils import logging

logger = logging.get_logger(__name__)

TEMPLATE = "agent_card_template.md"
BEGIN, END = "<!-- mara-hf:begin", "<!-- mara-hf:end -->"
TAGS = ["mara", "alignment", "logits-processor", "accept-reject", "mara-hf"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# setup.cfg's `url`: where mara-hf installs from while it is not on PyPI (used when the package metadata lacks it)
REPOSITORY_URL = "https://github.com/mara-hf/mara-hf"


def repository_url() -> str:
    """mara-hf's repository, from the installed package's metadata (its Project-URL Source, else its Home-page)."""
    try:
        meta = metadata.metadata("mara-hf")
    except metadata.PackageNotFoundError:
        return REPOSITORY_URL
    sources = [u.split(",", 1)[-1].strip() for u in meta.get_all("Project-URL") or [] if u.lower().startswith("source,")]
    return next((u for u in sources + [meta.get("Home-page")] if u and u.startswith("https://")), REPOSITORY_URL)


def _template_path() -> str:
    return str(resources.files("mara_hf.model_cards") / TEMPLATE)


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repo id (not a local path), else None: card metadata only takes ids."""
    if name and _HUB_ID.match(name) and not os.path.exists(name):
        return name
    return None


def render_card(config, agent_id: str, license: str | None = None) -> ModelCard:
    """Render a fresh card for an agent config; `agent_id` is the repo id or folder users load it from."""
    from ..data.prompts import hub_datasets

    training = dict(config.training or {})
    imitation = "(imitation)" in str(training.get("trainer"))
    base = config.base_model_name_or_path
    base_id = _hub_id(base)
    datasets = [d for d in hub_datasets(training.get("datasets")) if _hub_id(d)]
    data = ModelCardData(
        library_name="mara-hf",
        license=license,
        base_model=base_id,
        tags=list(TAGS),
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    width1, width2 = config.hidden_dims
    n_params = 2 * config.state_dim + (config.state_dim + 1) * width1 + (width1 + 1) * width2 + (width2 + 1) * 2
    return ModelCard.from_template(
        data,
        template_path=_template_path(),
        title=f"MARA agent for {base}" if base else "MARA agent",
        base_model=base,
        base_model_url=f"https://huggingface.co/{base_id}" if base_id else base,
        model_id=base or "YOUR_MODEL_ID",
        agent_id=agent_id,
        repository_url=repository_url(),
        n_params=f"{n_params / 1e6:.2f} M" if n_params >= 100_000 else f"{n_params:,}",
        state_dim=config.state_dim,
        hidden_dims=config.hidden_dims,
        top_k=config.top_k,
        top_p=config.top_p,
        strategy=config.strategy,
        decoding=_DECODING.get(config.strategy, _DECODING["first"]),
        selection=_selection(config),
        mara_hf_version=config.mara_hf_version,
        facts=_training_facts(training),
        settings=_settings_rows(training.get("settings") or {}, imitation=imitation),
        command="mara-hf imitate" if imitation else "mara-hf train",
    )


# What decoding does with the agent's decisions, per strategy (the card's opening paragraph).
_DECODING = {
    "first": "decoding emits the first accepted candidate",
    "max_prob": "decoding emits the candidate it is surest to accept",
    "filter": "decoding samples among the accepted candidates",
    "veto": "rejected candidates are removed and the LLM decodes among the rest as usual (greedy or sampled); "
            "when every candidate is rejected, none is removed",
}


def _selection(config) -> str:
    rule = f"accept when P(accept) > {config.threshold:g}"
    if config.strategy == "veto":
        return f"`veto`: {rule}; the LLM chooses among the accepted candidates, all of them when none is accepted"
    return f"`{config.strategy}`, {rule}, fallback candidate {config.fallback_index}"


# How the recorded training facts read in the card, in this order; other keys follow under their own name.
_FACTS = (("datasets", "prompts"), ("reward_sources", "reward"), ("episodes", "episodes"), ("trainer", "trainer"),
          ("init_agent", "started from"), ("source", "weights from"), ("threshold_chosen", "accept threshold"))


def _training_facts(training: dict) -> list[tuple[str, str]]:
    rows = []
    for key in [k for k, _ in _FACTS] + sorted(set(training) - {k for k, _ in _FACTS} - {"settings"}):
        value = training.get(key)
        if value in (None, [], ""):
            continue
        if key == "datasets":
            value = ", ".join(f"`{d}`" for d in value)
        elif key == "reward_sources":
            value = _rewards(value)
        elif key == "threshold_chosen" and isinstance(value, dict):  # set after training, on other prompts
            value = f"{value['threshold']:g}, chosen on {value['chosen_on']}" + (
                f" (the fit's accuracies are at {value['fit_accuracies_at']:g})" if "fit_accuracies_at" in value else "")
        elif key == "init_agent" and isinstance(value, dict):  # --init-agent: the agent and what it had learned
            known = [f"{value['episodes']} episodes" if value.get("episodes") else "",
                     _rewards(value["reward_sources"]) if value.get("reward_sources") else ""]
            value = f"`{value.get('name_or_path')}`" + (f" ({', '.join(k for k in known if k)})" if any(known) else "")
        else:
            value = _cell(value)
        rows.append((dict(_FACTS).get(key, key), value))
    return rows


def _rewards(sources) -> str:
    return " + ".join(f"`{r['name']}` x {r['multiplier']:g}" if isinstance(r, dict) else f"`{r}`" for r in sources)


def _settings_rows(settings: dict, imitation: bool = False) -> list[tuple[str, str, str]]:
    """(flag, value, default) for the training settings that differ from the trainer's defaults (`mara-hf train`'s
    `MaraTrainingConfig`, or `mara-hf imitate`'s `ImitationConfig`)."""
    from ..training.imitation_config import ImitationConfig
    from ..training.sac_config import MaraTrainingConfig

    config = ImitationConfig if imitation else MaraTrainingConfig
    defaults = config().to_dict()
    settings = {config.RENAMED.get(name, name): value for name, value in settings.items()}  # 0.1's names
    return [("--" + name.replace("_", "-"), _cell(value), _cell(defaults[name]) if name in defaults else "")
            for name, value in settings.items() if name != "device" and (name not in defaults or value != defaults[name])]


def _cell(value) -> str:
    """A value as a Markdown table cell: on/off for switches, strings quoted, lists joined."""
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, (list, tuple)):
        text = "; ".join(f'"{v}"' if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)
                         for v in value) or "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, dict):  # e.g. imitation's demonstration counts
        text = ", ".join(f"{k.replace('_', ' ')} {_cell(v)}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def merge_cards(existing: ModelCard | None, new: ModelCard) -> ModelCard:
    """Put `new`'s generated section and metadata into `existing`, keeping everything else in it."""
    if existing is None:
        return new
    data = existing.data.to_dict()
    for key, value in new.data.to_dict().items():
        if key == "tags":
            value = list(dict.fromkeys((data.get("tags") or []) + value))
        if value is not None:
            data[key] = value
    section = new.text[new.text.index(BEGIN) :]
    body = existing.text
    start = body.find(BEGIN)
    if re.search(r"^# ", body[: start if start >= 0 else len(body)], re.M):
        # the person's text above the section has its own title: ours would be a second one
        section = re.sub(r"^# .*\n\n?", "", section, count=1, flags=re.M)
    stop = body.find(END, start) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        body = body[:start] + section[: section.index(END) + len(END)] + body[stop + len(END) :]
    else:  # a card written by hand: keep it all and add ours below
        body = body.rstrip("\n") + "\n\n" + section
    tail = section[section.index(END) + len(END) :].strip("\n")
    if tail and tail not in body:  # e.g. a card from before the citation moved out of the generated part
        body = body.rstrip("\n") + "\n\n" + tail + "\n"
    merged = ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{body}")
    return merged


def write_model_card(config, save_directory, repo_id: str | None = None, existing: ModelCard | None = None,
                     license: str | None = None) -> str:
    """Write README.md in `save_directory`, updating the card already there (or `existing`) in place."""
    path = os.path.join(save_directory, "README.md")
    if existing is None and os.path.isfile(path):
        existing = ModelCard.load(path)
    # A license given here wins; otherwise keep the one in the card (a person may have set it).
    license = license or (existing.data.license if existing is not None else None) or "apache-2.0"
    card = merge_cards(existing, render_card(config, repo_id or str(save_directory), license=license))
    card.save(path)
    return path


def fetch_hub_card(repo_id: str, token=None, revision=None) -> ModelCard | None:
    """The card currently on the Hub for `repo_id`, or None when the repo or its README does not exist."""
    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    return ModelCard.load(path)
