"""Write the transformers side of the vLLM equality tests: ``tests/engines/fixtures/tiny_reference.json``.

vLLM's environment has an older transformers than bh_helpers needs, so ``route()`` cannot run next
to vLLM. This script runs in the MAIN environment: the embedded tiny OLMoE in float32 on the CPU,
greedy decoding of a few prompts under each routing config of ``tests/engines/configs/`` (and
native routing), a windowed perplexity and lm-eval's accuracy on the local HellaSwag-style task
under the BH config. ``tests/engines/test_vllm.py``
(vLLM's environment) compares vLLM's output with it; ``tests/test_engines.py`` (main environment)
checks that this file is current.

Usage::

    PYTHONPATH=. python scripts/vllm_reference.py          # rewrite the fixture
    PYTHONPATH=. python scripts/vllm_reference.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "engines" / "configs"
FIXTURE = ROOT / "tests" / "engines" / "fixtures" / "tiny_reference.json"
#: Scenarios: name -> routing config file (None: the model's own routing, no route()).
SCENARIOS = {"native": None, "native_hook": "native.json", "bh": "bh.json", "topk4": "topk4.json",
             "static": "static.json"}
PROMPTS = [
    "The history of the city begins",
    "def parse(line):\n    ",
    "In 1897 the company",
    "import numpy as np\n\nclass Model:\n    def __init__(self",
]
NEW_TOKENS = 24
PERPLEXITY = {"scenario": "bh", "window": 64, "stride": 32, "max_chars": 1500}
LM_EVAL = {"scenario": "bh", "task": "bh_hellaswag_style", "limit": 40}
TOLERANCE = 1e-5  # --check: log-probs may move this much between runs of one environment


def _greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their float32 log-probs, one full forward per step (no cache)."""
    ids = list(prompt_ids)
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
            logp = torch.log_softmax(logits, dim=-1)  # (V,)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    return tokens, logprobs


def reference() -> dict:
    """The fixture's content (deterministic on one machine)."""
    from bh_helpers.engines.config import RoutingConfig
    from bh_helpers.evaluation.scoring import perplexity
    from bh_helpers.models.loading import load_model
    from bh_helpers.routing.patch import route

    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", device="cpu", dtype=torch.float32)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out: dict = {"model": "tiny", "dtype": "float32", "new_tokens": NEW_TOKENS, "prompt_ids": prompts,
                 "scenarios": {}}
    for name, config_file in SCENARIOS.items():
        if config_file is None:
            runs = [_greedy(model, p, NEW_TOKENS) for p in prompts]
            summary = None
        else:
            config = RoutingConfig.load(CONFIGS / config_file)
            with route(model, config.to_selector()) as rec:
                runs = [_greedy(model, p, NEW_TOKENS) for p in prompts]
                summary = rec.summary()
        out["scenarios"][name] = {
            "config": config_file,
            "tokens": [r[0] for r in runs],
            "logprobs": [r[1] for r in runs],
            "mean_k": None if summary is None else float(summary["mean_k"]),
        }
    text = _ppl_text()
    config = RoutingConfig.load(CONFIGS / SCENARIOS[PERPLEXITY["scenario"]])
    with route(model, config.to_selector()):
        result = perplexity(model, tokenizer, [text], window=PERPLEXITY["window"], stride=PERPLEXITY["stride"],
                            progress=False)
    out["perplexity"] = {**PERPLEXITY, "text": text, "perplexity": result.perplexity, "nll": result.nll,
                         "n_tokens": result.n_tokens, "window_nll": result.window_nll}
    out["lm_eval"] = {**LM_EVAL, **_lm_eval(model, tokenizer)}
    return out


def _lm_eval(model, tokenizer) -> dict:
    """lm-eval's accuracy on the local task under the scenario's routing (HFLM on transformers)."""
    from bh_helpers.engines.config import RoutingConfig
    from bh_helpers.evaluation.lm_eval import evaluate_routed

    selector = RoutingConfig.load(CONFIGS / SCENARIOS[LM_EVAL["scenario"]]).to_selector()
    results = evaluate_routed(model, tokenizer, selector, [LM_EVAL["task"]], limit=LM_EVAL["limit"])
    task = results["results"][LM_EVAL["task"]]
    return {"acc": task["acc,none"], "acc_norm": task["acc_norm,none"]}


def _ppl_text() -> str:
    path = ROOT / "bh_helpers" / "data" / "fixtures" / "wikitext_style.txt"
    return path.read_text(encoding="utf-8")[: PERPLEXITY["max_chars"]]


def stale(current: dict, saved: dict) -> list[str]:
    """What differs between a fresh reference and the saved one (empty when current)."""
    problems = []
    for key in ("prompt_ids", "new_tokens", "dtype"):
        if current[key] != saved.get(key):
            problems.append(key)
    for name, run in current["scenarios"].items():
        old = saved.get("scenarios", {}).get(name)
        if old is None or old["tokens"] != run["tokens"] or old["config"] != run["config"]:
            problems.append(f"scenarios.{name}")
            continue
        diff = max(abs(a - b) for xs, ys in zip(run["logprobs"], old["logprobs"]) for a, b in zip(xs, ys))
        if diff > TOLERANCE:
            problems.append(f"scenarios.{name}.logprobs (max diff {diff:.2g})")
    if current["lm_eval"] != saved.get("lm_eval"):
        problems.append("lm_eval")
    ppl, old = current["perplexity"], saved.get("perplexity", {})
    if ppl["text"] != old.get("text") or ppl["n_tokens"] != old.get("n_tokens") \
            or abs(ppl["nll"] - old.get("nll", float("nan"))) > TOLERANCE:
        problems.append("perplexity")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the saved fixture instead of writing")
    args = parser.parse_args(argv)
    current = reference()
    if args.check:
        problems = stale(current, json.loads(FIXTURE.read_text()))
        if problems:
            print(f"{FIXTURE} is stale ({', '.join(problems)}): rerun scripts/vllm_reference.py", file=sys.stderr)
            return 1
        return 0
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(current, indent=1) + "\n")
    print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
