"""The agents shipped inside mara-hf (folders under `mara_hf/agent/bundled/`), loadable by name."""


def bundled_agents() -> dict[str, str]:
    """Agents shipped inside mara-hf: name -> folder, loadable with `MaraProcessor.from_pretrained(folder, model=m)`."""
    from importlib import resources

    root = resources.files("mara_hf.agent") / "bundled"
    if not root.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(root.iterdir(), key=lambda p: p.name) if (p / "config.json").is_file()}
