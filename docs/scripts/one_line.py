"""The one line as users write it (MaraProcessor.from_pretrained(...), then generate with logits_processor or
custom_generate), greedy and sampled, batch 1 and 8, timed against plain generate in the same run; uses only the
public API, so it runs on any version of mara-hf (docs/benchmarks.md). Run: python docs/scripts/one_line.py"""
import sys, time, json, torch
from mara_hf import MaraProcessor
from mara_hf.models import load_model
from mara_hf.evaluation.bench import DEFAULT_PROMPTS
from mara_hf.data.encoding import encode_prompts
model, tok = load_model("embedded", None, None)
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95)
out = {}
for agent in ["smollm2-135m-refusal", None]:
    if agent is None:
        from mara_hf import MaraAgent, MaraConfig
        torch.manual_seed(0)
        mara = MaraProcessor(MaraAgent(MaraConfig(state_dim=576)), model=model)
    else:
        mara = MaraProcessor.from_pretrained(agent, model=model)
    for batch, n in ((1, 4), (8, 8)):
        encs = [encode_prompts(tok, DEFAULT_PROMPTS[i:i + batch]) for i in range(0, n, batch)]
        routes = {"plain": {}, "processor": dict(logits_processor=[mara]), "custom_generate": dict(custom_generate=mara.custom_generate)}
        for mode, kw in (("greedy", dict(do_sample=False)), ("sampled", SAMPLED)):
            t = {k: 0.0 for k in routes}; toks = {k: 0 for k in routes}
            for rep in range(2):
                for i, e in enumerate(encs):
                    names = list(routes); names = names[(i + rep) % 3:] + names[:(i + rep) % 3]
                    for name in names:
                        torch.manual_seed(i)
                        s = time.perf_counter()
                        o = model.generate(**e, max_new_tokens=48, pad_token_id=tok.pad_token_id or 0, **kw, **routes[name])
                        t[name] += time.perf_counter() - s
                        toks[name] += int((o[:, e["input_ids"].shape[1]:] != (tok.pad_token_id or 0)).sum())
            rate = {k: toks[k] / t[k] for k in routes}
            for k in ("processor", "custom_generate"):
                out[f"{agent or 'untrained'} b{batch} {mode} {k}"] = round(rate["plain"] / rate[k], 2)
            print(json.dumps({f"{agent or 'untrained'} b{batch} {mode}": {k: round(rate["plain"] / rate[k], 2) for k in routes}}), flush=True)
    mara.remove()
