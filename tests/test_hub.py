"""Push and pull agents through huggingface_hub's real HTTP client, against the loopback Hub (tests/hub_server.py).

Covers: push_to_hub + the pushed card's metadata and body, loading by repo id (MaraAgent, AutoModel,
MaraProcessor), pinned revisions (commit sha, tag), a card edited on the Hub by a person, offline loading from the
cache, private repos and tokens, and `mara-hf convert --push-to-hub`.
"""

import os

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import mara_hf
from mara_hf import MaraAgent, MaraConfig, MaraProcessor
from mara_hf.cli.app import main as cli_main

from hub_server import HubServer, patch_hub_endpoint, set_offline

TOKEN, USER = "hf_test_token", "testuser"
OTHER_TOKEN = "hf_other_token"
REPO = f"{USER}/mara-agent-tiny"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DIM = 32
BEGIN, END = "<!-- mara-hf:begin", "<!-- mara-hf:end -->"
TRAINING = {
    "source": "unit test",
    "datasets": ["PKU-Alignment/PKU-SafeRLHF"],
    "episodes": 123,
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(tokens={TOKEN: USER, OTHER_TOKEN: "someoneelse"}) as server:
        patch_hub_endpoint(monkeypatch, server.url, cache_dir=tmp_path / "default-cache")
        yield server


def make_agent(seed=0, state_dim=DIM, **config_kwargs) -> MaraAgent:
    config_kwargs.setdefault("base_model_name_or_path", BASE_ID)
    config_kwargs.setdefault("training", dict(TRAINING))
    torch.manual_seed(seed)
    agent = MaraAgent(MaraConfig(state_dim=state_dim, hidden_dims=[16, 8], **config_kwargs))
    with torch.no_grad():  # every layer matters, and the LayerNorm affine too
        for p in agent.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return agent.eval()


STATES = torch.randn(5, 3, DIM, generator=torch.Generator().manual_seed(1))


def outputs(agent) -> torch.Tensor:
    with torch.no_grad():
        return agent.eval()(STATES).logits


def same_agent(loaded, pushed) -> bool:
    state, ref = loaded.state_dict(), pushed.state_dict()
    return (
        isinstance(loaded, MaraAgent)
        and state.keys() == ref.keys()
        and all(torch.equal(state[k], ref[k]) for k in ref)
        and torch.equal(outputs(loaded), outputs(pushed))
    )


def tiny_llm(hidden_size=DIM) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def hub_card(repo_id, tmp_path, token=TOKEN, revision=None) -> tuple[str, ModelCard]:
    path = hf_hub_download(repo_id, "README.md", revision=revision, token=token, cache_dir=tmp_path / "card-cache")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text, ModelCard(text)


# ------------------------------------------------------------------------------------------------ push + card


def test_push_to_hub_uploads_agent_and_card(hub, tmp_path):
    agent = make_agent()
    commit = agent.push_to_hub(REPO, token=TOKEN)  # creates the repo
    api = HfApi()
    assert api.model_info(REPO).sha == commit.oid
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "README.md", "config.json", "model.safetensors"]

    text, card = hub_card(REPO, tmp_path)
    data = card.data.to_dict()
    assert data["library_name"] == "mara-hf"
    assert data["base_model"] == BASE_ID
    assert {"mara", "alignment", "logits-processor"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["PKU-Alignment/PKU-SafeRLHF"]

    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert f'MaraProcessor.from_pretrained("{REPO}", model=model)' in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_ID}")' in card.text
    assert "@inproceedings{zhang2025mara" in card.text and "10.24963/ijcai.2025/931" in card.text
    assert "2505.19743" in card.text
    assert str(tmp_path) not in text and "/tmp" not in text  # no trace of the temporary save folder

    # config.json on the Hub records the version that saved it
    config = MaraConfig.from_pretrained(REPO, cache_dir=tmp_path / "cfg-cache")
    assert config.mara_hf_version == mara_hf.__version__


def test_push_to_existing_repo_and_license(hub, tmp_path):
    HfApi().create_repo(REPO, token=TOKEN)  # created beforehand (e.g. on the website): push_to_hub reuses it
    make_agent().push_to_hub(REPO, token=TOKEN, license="mit", commit_message="my message")
    _, card = hub_card(REPO, tmp_path)
    assert card.data.to_dict()["license"] == "mit"
    assert [c.title for c in HfApi().list_repo_commits(REPO)][0] == "my message"


# ------------------------------------------------------------------------------------------------ pull by repo id


def test_pull_by_repo_id(hub, tmp_path):
    agent = make_agent()
    agent.push_to_hub(REPO, token=TOKEN)

    cache = tmp_path / "cache"
    assert same_agent(MaraAgent.from_pretrained(REPO, cache_dir=cache), agent)
    auto = AutoModel.from_pretrained(REPO, cache_dir=cache)
    assert type(auto) is MaraAgent and same_agent(auto, agent)
    assert same_agent(MaraAgent.from_pretrained(REPO), agent)  # default cache (HF_HUB_CACHE) too

    llm = tiny_llm()
    mara = MaraProcessor.from_pretrained(REPO, model=llm, cache_dir=tmp_path / "cache2", top_k=4)
    try:
        assert same_agent(mara.agent, agent) and mara.top_k == 4
        input_ids = torch.tensor([[1, 5, 9, 3]])
        out = llm.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3, do_sample=False,
                           logits_processor=[mara], pad_token_id=0)
        assert out.shape == (1, 7)
        assert mara.stats.steps == 3
    finally:
        mara.remove()


def test_pull_missing_repo_is_a_clear_error(hub, tmp_path):
    with pytest.raises(OSError, match=f"{USER}/no-such-agent"):
        MaraAgent.from_pretrained(f"{USER}/no-such-agent", cache_dir=tmp_path / "cache")
    # a Hub repo that holds some other model, not an agent
    HfApi().create_repo(f"{USER}/llm", token=TOKEN)
    folder = tmp_path / "llm"
    tiny_llm().config.save_pretrained(folder)
    HfApi().upload_folder(repo_id=f"{USER}/llm", folder_path=folder, token=TOKEN)
    with pytest.raises(OSError, match="not a MARA agent"):
        MaraAgent.from_pretrained(f"{USER}/llm", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ revisions


def test_pinned_revisions(hub, tmp_path):
    first_agent, second_agent = make_agent(seed=1), make_agent(seed=2)
    assert not torch.equal(outputs(first_agent), outputs(second_agent))
    first = first_agent.push_to_hub(REPO, token=TOKEN)
    second = second_agent.push_to_hub(REPO, token=TOKEN)
    assert first.oid != second.oid
    HfApi().create_tag(REPO, tag="v1", revision=first.oid, token=TOKEN)

    cache = tmp_path / "cache"  # one cache for all revisions: snapshots are kept apart by commit
    assert same_agent(MaraAgent.from_pretrained(REPO, revision=first.oid, cache_dir=cache), first_agent)
    assert same_agent(MaraAgent.from_pretrained(REPO, cache_dir=cache), second_agent)
    assert same_agent(MaraAgent.from_pretrained(REPO, revision="v1", cache_dir=cache), first_agent)
    assert same_agent(MaraAgent.from_pretrained(REPO, revision="main", cache_dir=cache), second_agent)
    assert same_agent(AutoModel.from_pretrained(REPO, revision=first.oid, cache_dir=cache), first_agent)
    assert same_agent(AutoModel.from_pretrained(REPO, revision="v1", cache_dir=cache), first_agent)

    llm = tiny_llm()
    mara = MaraProcessor.from_pretrained(REPO, model=llm, revision="v1", cache_dir=cache)
    assert same_agent(mara.agent, first_agent)
    mara.remove()

    with pytest.raises(OSError, match="no-such-revision"):
        MaraAgent.from_pretrained(REPO, revision="no-such-revision", cache_dir=cache)


# ------------------------------------------------------------------------------------------------ card edited on the Hub


def test_card_edited_on_the_hub_is_kept(hub, tmp_path):
    make_agent(top_k=40).push_to_hub(REPO, token=TOKEN)
    text, card = hub_card(REPO, tmp_path)
    assert "top-k 40," in text

    # A person edits the card on the website: prose before and after the generated section, metadata, a tag.
    card.data.tags = list(card.data.tags) + ["my-own-tag"]
    card.data.language = "en"
    card.data.my_key = "kept"
    card.text = "Intro written by a person.\n\n" + card.text.rstrip("\n") + "\n\n## Notes\nNotes by a person.\n"
    HfApi().upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=REPO, token=TOKEN,
                        commit_message="Edit card")

    changed = make_agent(seed=3, top_k=7, strategy="filter")
    commit = changed.push_to_hub(REPO, token=TOKEN)
    text, card = hub_card(REPO, tmp_path, revision=commit.oid)
    data = card.data.to_dict()

    assert card.text.count("Intro written by a person.") == 1 and card.text.count("Notes by a person.") == 1
    assert card.text.index("Intro written") < card.text.index(BEGIN) < card.text.index("Notes by a person.")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert data["language"] == "en" and data["my_key"] == "kept" and "my-own-tag" in data["tags"]
    assert {"mara", "alignment", "logits-processor"} <= set(data["tags"])
    assert len(data["tags"]) == len(set(data["tags"]))
    assert data["library_name"] == "mara-hf" and data["base_model"] == BASE_ID
    # the generated section was refreshed for the new agent
    assert "top-k 7," in text and "top-k 40," not in text and "`filter`" in text
    assert f'MaraProcessor.from_pretrained("{REPO}", model=model)' in text

    # pushing the same agent again leaves the card as it is
    again = changed.push_to_hub(REPO, token=TOKEN)
    assert hub_card(REPO, tmp_path, revision=again.oid)[0] == text


def test_hand_written_card_on_the_hub(hub, tmp_path):
    HfApi().create_repo(REPO, token=TOKEN)
    hand = "---\nlanguage: fr\ntags:\n- handmade\n---\n# My agent\n\nWritten by hand.\n"
    HfApi().upload_file(path_or_fileobj=hand.encode(), path_in_repo="README.md", repo_id=REPO, token=TOKEN)
    make_agent().push_to_hub(REPO, token=TOKEN)
    make_agent().push_to_hub(REPO, token=TOKEN)
    text, card = hub_card(REPO, tmp_path)
    assert card.text.startswith("# My agent") and card.text.count("Written by hand.") == 1
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    data = card.data.to_dict()
    assert data["language"] == "fr" and {"handmade", "mara"} <= set(data["tags"])
    assert data["library_name"] == "mara-hf"


# ------------------------------------------------------------------------------------------------ offline


def test_offline_loads_from_cache(hub, tmp_path, monkeypatch):
    agent = make_agent()
    commit = agent.push_to_hub(REPO, token=TOKEN)
    HfApi().create_repo(f"{USER}/never-downloaded", token=TOKEN)
    make_agent(seed=5).push_to_hub(f"{USER}/never-downloaded", token=TOKEN)
    cache = tmp_path / "cache"
    MaraAgent.from_pretrained(REPO, cache_dir=cache)
    AutoModel.from_pretrained(REPO, cache_dir=cache)
    MaraAgent.from_pretrained(REPO, revision=commit.oid, cache_dir=cache)

    set_offline(monkeypatch, True)
    before = len(hub.requests)
    assert same_agent(MaraAgent.from_pretrained(REPO, cache_dir=cache), agent)
    assert same_agent(AutoModel.from_pretrained(REPO, cache_dir=cache), agent)
    assert same_agent(MaraAgent.from_pretrained(REPO, revision=commit.oid, cache_dir=cache), agent)
    llm = tiny_llm()
    mara = MaraProcessor.from_pretrained(REPO, model=llm, cache_dir=cache)
    assert same_agent(mara.agent, agent)
    mara.remove()

    # An agent never downloaded: mara_hf names it and says offline mode stopped it.
    for load in (MaraAgent.from_pretrained, lambda name, **kw: MaraProcessor.from_pretrained(name, model=llm, **kw)):
        with pytest.raises(OSError) as exc:
            load(f"{USER}/never-downloaded", cache_dir=cache)
        message = str(exc.value)
        assert f"'{USER}/never-downloaded' is not in {cache}" in message and "offline mode is on" in message
        assert isinstance(exc.value.__cause__, OSError)  # transformers' own error stays in the chain
    # AutoModel goes through transformers alone (AutoConfig fails before MaraAgent is reached): its generic message.
    with pytest.raises(OSError, match="couldn't find them in the cached files"):
        AutoModel.from_pretrained(f"{USER}/never-downloaded", cache_dir=cache)
    assert len(hub.requests) == before  # nothing reached the server

    set_offline(monkeypatch, False)
    with pytest.raises(OSError, match=r"is not in .* and local_files_only=True"):
        MaraAgent.from_pretrained(f"{USER}/never-downloaded", cache_dir=cache, local_files_only=True)
    assert len(hub.requests) == before
    assert same_agent(MaraAgent.from_pretrained(f"{USER}/never-downloaded", cache_dir=cache), make_agent(seed=5))


# ------------------------------------------------------------------------------------------------ private repos


def test_private_repo_needs_the_token(hub, tmp_path, monkeypatch):
    agent = make_agent()
    agent.push_to_hub(REPO, token=TOKEN, private=True)
    assert HfApi().model_info(REPO, token=TOKEN).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO)

    # No token, or someone else's: refused, and the error says the repo may be private and needs a token.
    for token in (None, OTHER_TOKEN):
        with pytest.raises(OSError) as exc:
            MaraAgent.from_pretrained(REPO, token=token, cache_dir=tmp_path / "refused")
        message = str(exc.value)  # transformers' OSError, raised from huggingface_hub's RepositoryNotFoundError
        assert f"{REPO} is not a local folder and is not a valid model identifier" in message
        assert "If this is a private repository, make sure to pass a token" in message
        assert isinstance(exc.value.__cause__ or exc.value.__context__, RepositoryNotFoundError)
        with pytest.raises(OSError, match="private"):
            AutoModel.from_pretrained(REPO, token=token, cache_dir=tmp_path / "refused")
        with pytest.raises(OSError, match="private"):
            MaraProcessor.from_pretrained(REPO, model=tiny_llm(), token=token, cache_dir=tmp_path / "refused")

    # token= argument
    assert same_agent(MaraAgent.from_pretrained(REPO, token=TOKEN, cache_dir=tmp_path / "c1"), agent)
    assert same_agent(AutoModel.from_pretrained(REPO, token=TOKEN, cache_dir=tmp_path / "c2"), agent)
    mara = MaraProcessor.from_pretrained(REPO, model=tiny_llm(), token=TOKEN, cache_dir=tmp_path / "c3")
    assert same_agent(mara.agent, agent)
    mara.remove()

    # HF_TOKEN in the environment
    patch_hub_endpoint(monkeypatch, hub.url, token=TOKEN, cache_dir=tmp_path / "default-cache")
    assert same_agent(MaraAgent.from_pretrained(REPO, cache_dir=tmp_path / "c4"), agent)
    assert same_agent(AutoModel.from_pretrained(REPO, cache_dir=tmp_path / "c5"), agent)
    mara = MaraProcessor.from_pretrained(REPO, model=tiny_llm(), cache_dir=tmp_path / "c6")
    assert same_agent(mara.agent, agent)
    mara.remove()

    # a second push to the private repo (HF_TOKEN) keeps it private and reads its card with the token
    make_agent(seed=4).push_to_hub(REPO)
    assert HfApi().model_info(REPO).private is True
    assert same_agent(MaraAgent.from_pretrained(REPO, cache_dir=tmp_path / "c7"), make_agent(seed=4))


# ------------------------------------------------------------------------------------------------ convert CLI


@pytest.fixture
def actor_and_base(tmp_path):
    torch.manual_seed(7)
    reference = MaraAgent(MaraConfig(state_dim=DIM, hidden_dims=[16, 8]))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.5 * torch.randn_like(p))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    actor = tmp_path / "actor.pth"
    torch.save(state, actor)
    base = tmp_path / "base-llm"
    tiny_llm().config.save_pretrained(base)
    return actor, base, reference.eval()


def test_cli_convert_push_to_hub(hub, tmp_path, monkeypatch, actor_and_base, capsys):
    actor, base, reference = actor_and_base
    patch_hub_endpoint(monkeypatch, hub.url, token=TOKEN, cache_dir=tmp_path / "default-cache")  # CLI: HF_TOKEN
    output = tmp_path / "converted"
    repo = f"{USER}/converted"
    rc = cli_main(["convert", str(actor), "--base-model", str(base), "--output", str(output), "--push-to-hub", repo])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"Pushed to {repo}" in out.out
    assert os.path.isfile(output / "model.safetensors")

    info = HfApi().model_info(repo)
    assert info.private is False
    assert {s.rfilename for s in info.siblings} >= {"README.md", "config.json", "model.safetensors"}
    loaded = MaraAgent.from_pretrained(repo, cache_dir=tmp_path / "cache")
    assert same_agent(loaded, reference)
    assert loaded.config.base_model_name_or_path == str(base)
    assert loaded.config.training["converted_from"] == "actor.pth"
    assert same_agent(AutoModel.from_pretrained(repo, cache_dir=tmp_path / "cache"), reference)

    text, card = hub_card(repo, tmp_path)
    assert f'MaraProcessor.from_pretrained("{repo}", model=model)' in text  # the repo id, not the output folder
    data = card.data.to_dict()
    assert data["library_name"] == "mara-hf" and "base_model" not in data  # a local base model is no Hub id
    assert data["datasets"] == ["PKU-Alignment/PKU-SafeRLHF"]  # the paper's training facts


def test_cli_convert_push_to_private_repo(hub, tmp_path, monkeypatch, actor_and_base, capsys):
    actor, base, reference = actor_and_base
    patch_hub_endpoint(monkeypatch, hub.url, token=TOKEN, cache_dir=tmp_path / "default-cache")
    repo = f"{USER}/converted-private"
    rc = cli_main(["convert", str(actor), "--base-model", str(base), "--output", str(tmp_path / "out"),
                   "--push-to-hub", repo, "--private"])
    assert rc == 0, capsys.readouterr().err
    assert HfApi().model_info(repo).private is True
    assert same_agent(MaraAgent.from_pretrained(repo, cache_dir=tmp_path / "cache"), reference)
    with pytest.raises(OSError, match="private"):
        MaraAgent.from_pretrained(repo, token=False, cache_dir=tmp_path / "cache2")


def test_cli_convert_push_without_token_fails_cleanly(hub, tmp_path, actor_and_base, capsys):
    actor, base, _ = actor_and_base
    rc = cli_main(["convert", str(actor), "--base-model", str(base), "--output", str(tmp_path / "out"),
                   "--push-to-hub", f"{USER}/converted"])
    out = capsys.readouterr()
    assert rc == 2  # a user error: one line on stderr, no traceback
    assert "Saved the agent" in out.out and os.path.isfile(tmp_path / "out" / "model.safetensors")  # kept locally
    assert "mara-hf convert: error:" in out.err and "401" in out.err and "Traceback" not in out.err
    assert ("model", f"{USER}/converted") not in hub.repos


# ------------------------------------------------------------------------------------- Hub custom_generate recipe

RECIPE = os.path.join(os.path.dirname(__file__), "..", "examples", "mara-generate")


def test_custom_generate_recipe_from_the_hub(hub, tmp_path):
    """examples/mara-generate pushed as a repo: `model.generate(custom_generate=repo, trust_remote_code=True,
    mara_agent=...)` decodes as `custom_generate=mara.custom_generate` does, and runs nothing without consent."""
    from tiny_models import random_prompts, tiny_llama

    api = HfApi()
    api.create_repo(f"{USER}/mara-generate", token=TOKEN)
    api.upload_folder(repo_id=f"{USER}/mara-generate", folder_path=RECIPE, token=TOKEN)
    agent = make_agent(seed=3)
    agent.push_to_hub(REPO, token=TOKEN)
    model = tiny_llama(seed=0)
    ids, mask = random_prompts(batch=2, length=6, pads=(2, 0), seed=4)
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    got = model.generate(**settings, custom_generate=f"{USER}/mara-generate", trust_remote_code=True, mara_agent=REPO)
    mara = MaraProcessor(MaraAgent.from_pretrained(REPO), model=model)
    assert got.tolist() == model.generate(**settings, custom_generate=mara.custom_generate).tolist()
    assert mara.stats.rejections > 0  # the agent changed something
    assert got.tolist() != model.generate(**settings, do_sample=False).tolist()
    with pytest.raises(ValueError, match="custom generation code"):
        model.generate(**settings, custom_generate=f"{USER}/mara-generate", trust_remote_code=False, mara_agent=REPO)
    with pytest.raises(ValueError, match="mara_agent"):
        model.generate(**settings, custom_generate=f"{USER}/mara-generate", trust_remote_code=True)


def test_custom_generate_recipe_requirements():
    """The recipe asks for mara-hf and for a transformers that gates its code behind trust_remote_code also from a
    local folder (5.12, huggingface/transformers#46483), no lower than the package's own floor."""
    from packaging.requirements import Requirement

    with open(os.path.join(RECIPE, "custom_generate", "requirements.txt")) as f:
        reqs = {r.name: r for r in (Requirement(line.strip()) for line in f if line.strip())}
    assert set(reqs) == {"mara-hf", "transformers"}
    with open(os.path.join(os.path.dirname(__file__), "..", "setup.cfg")) as f:
        floor = next(Requirement(line.strip()) for line in f if line.strip().startswith("transformers>="))
    assert reqs["transformers"].specifier == floor.specifier
    assert not reqs["transformers"].specifier.contains("5.11.0")
