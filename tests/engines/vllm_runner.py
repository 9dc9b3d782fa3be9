"""One vLLM run of the tiny model, in its own process: ``python vllm_runner.py REQUEST.json OUT.json``.

The request names the routing config (or none), the engine options (eager or compiled, tensor and
expert parallel) and what to compute (greedy tokens of token-id prompts, a windowed perplexity).
The plugin reads ``BH_ROUTING_CONFIG`` once per process, so every scenario gets a fresh one; the
test sets the variable in the child's environment. The result (or the error text when the engine
refuses to start) goes to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "bh_helpers" / "data" / "tiny_olmoe"


def run(request: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=request.get("model") or str(MODEL),
        dtype="float32",
        seed=0,
        max_model_len=256,
        max_num_seqs=8,
        enforce_eager=request.get("eager", True),
        tensor_parallel_size=request.get("tp", 1),
        enable_expert_parallel=request.get("ep", False),
    )
    out: dict = {"init_s": time.perf_counter() - start}
    prompts = request.get("prompt_ids")
    if prompts:
        params = SamplingParams(temperature=0.0, max_tokens=request["new_tokens"], logprobs=0, ignore_eos=True)
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        tokens, logprobs = [], []
        for result in results:
            completion = result.outputs[0]
            tokens.append(list(completion.token_ids))
            logprobs.append([step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs)])
        out.update(tokens=tokens, logprobs=logprobs)
    if request.get("perplexity"):
        from bh_helpers.engines.perplexity import vllm_perplexity

        ppl = request["perplexity"]
        result = vllm_perplexity(llm, [ppl["text"]], window=ppl["window"], stride=ppl["stride"])
        out["perplexity"] = {"perplexity": result.perplexity, "nll": result.nll, "n_tokens": result.n_tokens,
                             "window_nll": result.window_nll}
    out["total_s"] = time.perf_counter() - start
    return out


def main() -> int:
    request = json.loads(Path(sys.argv[1]).read_text())
    try:
        out = {"ok": True, **run(request)}
    except Exception as err:  # noqa: BLE001 - the test reads the error text
        out = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    Path(sys.argv[2]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
