"""Evaluate the embedded tiny OLMoE (or any checkpoint) on CPU and write its model card.

Writes ``README.md`` and ``card_metrics.json`` next to the checkpoint (default
``bh_helpers/data/tiny_olmoe/``). Metrics, all on the committed evaluation slice
(``bh_helpers/data/corpus/evaluation.jsonl``, from the test split), per domain:

* perplexity of the model vs a unigram model with the same tokenizer (fitted on the train tokens
  ``corpus_build/tokens_train_*.npy``, add-one smoothing), scored on exactly the same tokens;
* routing alive: per layer, how many of the experts are chosen at least once in the top-k on the
  evaluation text, and the total-variation distance between the prose and code expert-usage
  histograms;
* static top-k at inference (k = 1, 2, 4, 8: each router's ``top_k`` is set, then restored).

Perplexity protocol (``PROTOCOL``): each record is tokenized and followed by one eos token, records
of a domain are concatenated into one stream, the stream is cut into non-overlapping windows of
256 tokens (the last window may be shorter), every window is scored independently from its own
start (no context carried over; stride = window = 256), and perplexity = exp of the token-weighted
mean next-token NLL over all predicted tokens (every token but the first of each window).

Usage::

    python scripts/model_card.py [--model bh_helpers/data/tiny_olmoe] [--max-windows 0]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bh_helpers.models.loading import EMBEDDED_CORPUS_DIR, EMBEDDED_MODEL_DIR, load_corpus_slice, load_model  # noqa: E402

WINDOW = 256
DOMAINS = ("prose", "code")
TOPKS = (1, 2, 4, 8)
PROTOCOL = (
    f"records tokenized and each followed by one eos, concatenated per domain; non-overlapping "
    f"{WINDOW}-token windows (stride {WINDOW}, last window may be shorter), each scored independently; "
    "perplexity = exp(token-weighted mean next-token NLL over every token but the first of each window)"
)


def domain_stream(tokenizer, records: list[dict]) -> torch.Tensor:
    """Token ids of all records of one domain, each followed by eos (1-D LongTensor)."""
    ids: list[int] = []
    for rec in records:
        ids.extend(tokenizer(rec["text"], add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows_of(stream: torch.Tensor, max_windows: int = 0) -> list[torch.Tensor]:
    """Non-overlapping windows of WINDOW tokens (last may be shorter; windows of 1 token dropped)."""
    wins = [stream[i : i + WINDOW] for i in range(0, stream.numel(), WINDOW)]
    wins = [w for w in wins if w.numel() >= 2]
    return wins[:max_windows] if max_windows > 0 else wins


def moe_routers(model) -> list[torch.nn.Module]:
    """The router (``mlp.gate``) of every decoder layer, in order."""
    return [layer.mlp.gate for layer in model.model.layers]


@contextlib.contextmanager
def static_top_k(model, k: int):
    """Set every router's ``top_k`` (read by ``OlmoeTopKRouter.forward`` in transformers 5.23) to k;
    always restore the original values."""
    routers = moe_routers(model)
    saved = [r.top_k for r in routers]
    try:
        for r in routers:
            r.top_k = k
        yield
    finally:
        for r, old in zip(routers, saved):
            r.top_k = old


@contextlib.contextmanager
def router_logit_capture(model):
    """Collect router logits per layer, computed from the router input as F.linear(h, W).

    Computed here, not taken from the router's return value, because router return contracts
    changed between transformers v5 releases.
    """
    store: dict[int, list[torch.Tensor]] = {}
    handles = []

    def make_hook(i):
        def hook(module, args):
            h = args[0].reshape(-1, module.weight.shape[1])
            store.setdefault(i, []).append(F.linear(h.float(), module.weight.float()).detach())

        return hook

    try:
        for i, router in enumerate(moe_routers(model)):
            handles.append(router.register_forward_pre_hook(make_hook(i)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _batches(windows: list[torch.Tensor], batch: int = 16) -> list[torch.Tensor]:
    """Full-length windows stacked by ``batch``, the shorter last window alone (no padding)."""
    full = [w for w in windows if w.numel() == WINDOW]
    rest = [w for w in windows if w.numel() != WINDOW]
    return [torch.stack(full[i : i + batch]) for i in range(0, len(full), batch)] + [w[None] for w in rest]


@torch.no_grad()
def nll_sum(model, windows: list[torch.Tensor], batch: int = 16) -> tuple[float, int]:
    """Summed next-token NLL and number of predicted tokens over independent windows."""
    total, count = 0.0, 0
    for x in _batches(windows, batch):  # (B, T)
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total, count


def unigram_logprobs(counts: np.ndarray) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities from token counts."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return torch.log((counts + 1.0) / (counts.sum() + counts.numel()))


def unigram_nll_sum(logp: torch.Tensor, windows: list[torch.Tensor]) -> tuple[float, int]:
    """Unigram NLL on exactly the tokens the model predicts (all but the first of each window)."""
    targets = torch.cat([w[1:] for w in windows])
    return float(-logp[targets].sum()), int(targets.numel())


@torch.no_grad()
def expert_usage(model, windows: list[torch.Tensor], k: int) -> np.ndarray:
    """Counts [layers, experts] of top-k choices over all tokens of ``windows``."""
    n_layers = len(moe_routers(model))
    n_experts = moe_routers(model)[0].weight.shape[0]
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    with router_logit_capture(model) as store:
        for x in _batches(windows):
            model(input_ids=x, use_cache=False)
    for i in range(n_layers):
        top = torch.cat(store[i]).topk(k, dim=-1).indices.reshape(-1)
        counts[i] = torch.bincount(top, minlength=n_experts).numpy()
    return counts


def domain_windows(tokenizer, records: list[dict], max_windows: int = 0) -> dict[str, list[torch.Tensor]]:
    """Evaluation windows per domain (see ``PROTOCOL``)."""
    return {d: windows_of(domain_stream(tokenizer, [r for r in records if r["domain"] == d]), max_windows)
            for d in DOMAINS}


def evaluate(model, tokenizer, records: list[dict], unigram_counts: np.ndarray | None, max_windows: int = 0) -> dict:
    """All card metrics on ``records`` (committed evaluation slice by default)."""
    native_k = moe_routers(model)[0].top_k
    wins = domain_windows(tokenizer, records, max_windows)
    out: dict = {"protocol": PROTOCOL, "window": WINDOW, "domains": {}}
    for d in DOMAINS:
        topk, n = {}, 0
        for k in TOPKS:
            with static_top_k(model, k):
                s, n = nll_sum(model, wins[d])
            topk[str(k)] = math.exp(s / n)
        if native_k in TOPKS:  # the native-k pass is the model's own perplexity
            model_ppl = topk[str(native_k)]
        else:
            s, n = nll_sum(model, wins[d])
            model_ppl = math.exp(s / n)
        entry = {"windows": len(wins[d]), "tokens_scored": n, "model_ppl": model_ppl}
        if unigram_counts is not None:
            unll, un = unigram_nll_sum(unigram_logprobs(unigram_counts), wins[d])
            entry["unigram_ppl"] = math.exp(unll / un)
            entry["unigram_over_model_ppl"] = entry["unigram_ppl"] / entry["model_ppl"]
        entry["static_topk_ppl"] = topk
        entry["static_topk_ppl_decreasing"] = all(topk[str(a)] > topk[str(b)] for a, b in zip(TOPKS, TOPKS[1:]))
        out["domains"][d] = entry
    usage = {d: expert_usage(model, wins[d], native_k) for d in DOMAINS}
    total = usage["prose"] + usage["code"]
    p = usage["prose"] / usage["prose"].sum(axis=1, keepdims=True)
    q = usage["code"] / usage["code"].sum(axis=1, keepdims=True)
    out["routing"] = {
        "top_k": native_k,
        "num_experts": int(total.shape[1]),
        "experts_used_per_layer": [int(x) for x in (total > 0).sum(axis=1)],
        "experts_used_per_layer_prose": [int(x) for x in (usage["prose"] > 0).sum(axis=1)],
        "experts_used_per_layer_code": [int(x) for x in (usage["code"] > 0).sum(axis=1)],
        "tv_prose_vs_code_per_layer": [float(x) for x in 0.5 * np.abs(p - q).sum(axis=1)],
        "max_expert_share_per_layer": [float(x) for x in (total / total.sum(axis=1, keepdims=True)).max(axis=1)],
    }
    return out


def train_unigram_counts(corpus: Path, vocab: int) -> tuple[np.ndarray, int]:
    counts = np.zeros(vocab, dtype=np.int64)
    for d in DOMAINS:
        path = corpus / f"tokens_train_{d}.npy"
        if not path.is_file():
            sys.exit(f"model_card: error: {path} is missing; run scripts/build_corpus.py and scripts/train_tokenizer.py.")
        counts += np.bincount(np.load(path), minlength=vocab)[:vocab]
    return counts, int(counts.sum())


def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:.0f}"


def render_card(model_dir: Path, metrics: dict, info: dict | None, config: dict, corpus_manifest: dict) -> str:
    """Markdown model card."""
    dom = metrics["domains"]
    routing = metrics["routing"]
    hp = (info or {}).get("hyperparameters", {})
    pk = corpus_manifest.get("debian_packages", {})
    lines = [
        "# tiny OLMoE (embedded model of bh-routing)",
        "",
        "A small `OlmoeForCausalLM` with the architecture of allenai/OLMoE-1B-7B-0924 (64 experts per layer, "
        "top-8 routing, `norm_topk_prob=False`), trained from scratch on prose and Python code so that its router "
        "logits, expert specialisation and top-k trade-offs behave like a real mixture of experts. It is the "
        "offline default of the bh-routing notebooks and of `bh-routing demo`; load it with "
        "`bh_helpers.models.loading.load_model(\"tiny\")`. It is a research fixture, not a useful language model.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                "max_position_embeddings", "tie_word_embeddings", "router_aux_loss_coef"):
        lines.append(f"| `{key}` | {config.get(key)} |")
    if info:
        lines.append(f"| parameters | {info.get('parameters', 0) / 1e6:.2f} M (weights stored in bfloat16) |")
    lines += [
        "",
        "## Training data",
        "",
        "Built deterministically by `scripts/build_corpus.py` from Debian packages "
        + ", ".join(f"`{k}` {v}" for k, v in sorted(pk.items()))
        + ":",
        "",
        "* prose: the Debian `fortunes` collection (one document per fortune) and the Python 3.11 documentation "
        "reStructuredText sources;",
        "* code: the Python 3.11 standard library (`libpython3.11-stdlib` / `-minimal`, without test directories).",
        "",
        f"Split into train / valid / test (about 90 / 5 / 5) by a stable hash: {corpus_manifest.get('split_rule', '')}. "
        "The tokenizer (byte-level BPE, vocabulary 4096, `<|endoftext|>` = bos/eos, `<|padding|>` = pad) and the "
        "model saw the train split only. Licences: BSD (fortunes, Regents of the University of California) and "
        "PSF License 2.0 (Python documentation and standard library); see `bh_helpers/data/corpus/LICENSES.md`.",
        "",
        "## Training",
        "",
    ]
    if info:
        lines += [
            f"* hardware: {info.get('device_name')} ({info.get('device')}), {info.get('precision')}; "
            f"torch {info.get('torch_version')}, transformers {info.get('transformers_version')}; "
            f"experts implementation `{info.get('experts_implementation')}`, attention `{info.get('attn_implementation')}`",
            f"* wall time {info.get('wall_time_s')} s, {info.get('steps')} steps, "
            f"{info.get('tokens_seen', 0) / 1e6:.1f} M tokens seen ({info.get('epochs', 0):.1f} epochs of the train split), "
            f"{info.get('tokens_per_s', 0) / 1e3:.0f} k tokens/s; weights kept from step {info.get('kept_step')} "
            "(best mean validation loss)",
            f"* objective: next-token cross-entropy + {hp.get('router_aux_loss_coef')} x load-balancing loss "
            f"(OLMoE's) + {hp.get('router_z_loss_coef')} x router z-loss (mean logsumexp(logits)^2)",
            f"* sequences of {hp.get('seq_len')} tokens, batch {hp.get('batch_size')} ({hp.get('sampling')}); "
            f"AdamW (betas {hp.get('betas')}, weight decay {hp.get('weight_decay')}, lr {hp.get('lr')}, "
            f"{hp.get('warmup_steps')} warmup steps, {hp.get('schedule')}, min lr ratio {hp.get('min_lr_ratio')}), "
            f"grad clip {hp.get('grad_clip')}, seed {hp.get('seed')}",
        ]
        fv = info.get("final_validation", {})
        if fv:
            lines.append("* validation perplexity at the end of training: "
                         + ", ".join(f"{d} {fv[d]['perplexity']:.2f}" for d in DOMAINS if d in fv)
                         + f" ({info.get('validation_protocol')})")
    else:
        lines.append("* no `training_info.json` next to the weights.")
    lines += [
        "",
        "## Results (CPU, float32, `scripts/model_card.py`)",
        "",
        f"Evaluation text: `bh_helpers/data/corpus/evaluation.jsonl` (test split). Protocol: {PROTOCOL}.",
        "",
        "| domain | windows | tokens scored | model ppl | unigram ppl | unigram / model |",
        "|---|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        e = dom[d]
        lines.append(f"| {d} | {e['windows']} | {e['tokens_scored']} | {fmt(e['model_ppl'])} | "
                     f"{fmt(e.get('unigram_ppl', float('nan')))} | {e.get('unigram_over_model_ppl', float('nan')):.1f}x |")
    lines += [
        "",
        "The unigram model uses the same tokenizer, is fitted on the train tokens with add-one smoothing, and is "
        "scored on exactly the tokens the model predicts.",
        "",
        "Static top-k at inference (every router's `top_k` set to k, weights = raw softmax probabilities as in "
        "OLMoE's `norm_topk_prob=False`):",
        "",
        "| domain | " + " | ".join(f"k={k}" for k in TOPKS) + " |",
        "|---|" + "---|" * len(TOPKS),
    ]
    for d in DOMAINS:
        lines.append(f"| {d} | " + " | ".join(fmt(dom[d]["static_topk_ppl"][str(k)]) for k in TOPKS) + " |")
    lines += [
        "",
        f"Routing (native top-{routing['top_k']}, {routing['num_experts']} experts, evaluation text of both domains):",
        "",
        "| layer | experts used | used on prose | used on code | TV(prose, code) | largest expert share |",
        "|---|---|---|---|---|---|",
    ]
    for i, n in enumerate(routing["experts_used_per_layer"]):
        lines.append(f"| {i} | {n} | {routing['experts_used_per_layer_prose'][i]} | "
                     f"{routing['experts_used_per_layer_code'][i]} | {routing['tv_prose_vs_code_per_layer'][i]:.3f} | "
                     f"{routing['max_expert_share_per_layer'][i]:.3f} |")
    lines += [
        "",
        "TV = total-variation distance between the prose and code expert-usage histograms of a layer "
        "(0 = identical usage, 1 = disjoint experts): a measure of domain specialisation. Largest expert share = "
        "fraction of all top-k choices of a layer that went to its most used expert (1/k means every token chose it).",
        "",
        "Files: `config.json`, `generation_config.json`, `model.safetensors` (bfloat16), tokenizer files, "
        "`training_info.json`, `training_log.jsonl`, `card_metrics.json` (these numbers, machine-readable).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR), help="'tiny', a local directory or a hub id")
    parser.add_argument("--out", type=Path, default=None, help="where to write README.md + card_metrics.json "
                        "(default: the model directory)")
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus_build", help="for the unigram train counts")
    parser.add_argument("--max-windows", type=int, default=0, help="windows per domain (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    model_dir = Path(args.model) if Path(args.model).is_dir() else EMBEDDED_MODEL_DIR
    out = args.out or model_dir
    card = out / "card_metrics.json"
    if not all((args.corpus / f"tokens_train_{d}.npy").is_file() for d in DOMAINS) and card.is_file():
        # the train tokens are not rebuilt here: the card's own counts are the same training tokens'
        counts = np.asarray(json.loads(card.read_text())["unigram"]["counts"], dtype=np.int64)
        n_train = int(counts.sum())
        print(f"unigram counts from {card} ({args.corpus}/tokens_train_*.npy absent)")
    else:
        counts, n_train = train_unigram_counts(args.corpus, model.config.vocab_size)
    records = load_corpus_slice("evaluation")
    metrics = evaluate(model, tokenizer, records, counts, args.max_windows)
    metrics["unigram"] = {"fitted_on": "corpus_build/tokens_train_{prose,code}.npy", "smoothing": "add-one",
                          "train_tokens": n_train, "counts": [int(c) for c in counts]}
    metrics["evaluation_text"] = "bh_helpers/data/corpus/evaluation.jsonl"
    weights = model_dir / "model.safetensors"
    if weights.is_file():
        # Lets tests detect a card that no longer describes the committed weights.
        metrics["model_safetensors_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    metrics["eval_seconds_cpu"] = round(time.perf_counter() - t0, 1)

    info_path = model_dir / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    corpus_manifest = json.loads((EMBEDDED_CORPUS_DIR / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "card_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(render_card(model_dir, metrics, info, model.config.to_dict(), corpus_manifest))

    for d in DOMAINS:
        e = metrics["domains"][d]
        print(f"{d}: model ppl {e['model_ppl']:.2f}, unigram ppl {e['unigram_ppl']:.2f} "
              f"({e['unigram_over_model_ppl']:.1f}x); top-k ppl "
              + ", ".join(f"k={k}: {e['static_topk_ppl'][str(k)]:.2f}" for k in TOPKS))
    print("experts used per layer:", metrics["routing"]["experts_used_per_layer"])
    print("TV(prose, code) per layer:", [round(x, 3) for x in metrics["routing"]["tv_prose_vs_code_per_layer"]])
    print(f"wrote {out / 'README.md'} and {out / 'card_metrics.json'} in {metrics['eval_seconds_cpu']} s")


if __name__ == "__main__":
    main()
