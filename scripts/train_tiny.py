"""Train the embedded tiny OLMoE (transformers ``OlmoeForCausalLM``) on the Debian corpus.

Same architecture family as allenai/OLMoE-1B-7B-0924 (64 experts per layer, top-8 routing,
``norm_topk_prob=False``), shrunk to hidden 128 / 6 layers so the bf16 checkpoint stays ~22 MB.

Inputs: ``corpus_build/tokens_{train,valid}_{prose,code}.npy`` (``scripts/train_tokenizer.py``)
and the tokenizer in ``bh_helpers/data/tiny_olmoe/``.

Loss = cross-entropy + 0.01 * OLMoE load-balancing loss (what ``OlmoeForCausalLM`` adds when
``output_router_logits=True``) + 0.001 * router z-loss (mean over layers and tokens of
``logsumexp(router_logits)^2``; keeps router logits small and well scaled, as in OLMoE / ST-MoE).

Batches are balanced: half the sequences from prose, half from code, at uniformly random offsets.
The learning-rate schedule is linear warmup + cosine over the *progress*, which is the larger of
``step / steps`` and ``elapsed / max_minutes``, so a wall-clock-limited run still anneals fully.
The weights with the best mean validation loss (evaluated every ``--eval-every`` steps) are the
ones saved (early stopping: the corpus is small and the run is many epochs long).

Examples::

    python scripts/train_tiny.py --device cpu --steps 20 --batch-size 4 --out outputs/tiny_smoke
    python scripts/train_tiny.py --device cuda --max-minutes 7 --out outputs/tiny_olmoe
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "bh_helpers" / "data" / "tiny_olmoe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DOMAINS = ("prose", "code")
SEQ_LEN = 256
Z_LOSS_COEF = 1e-3
EXPERTS_FALLBACK = ("grouped_mm", "batched_mm", "eager")


def model_config():
    """The tiny OLMoE configuration (hyper-parameters fixed by issue 4)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=64,  # per expert
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        output_router_logits=False,  # switched on only inside the training step
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the training loop")
    p.add_argument("--steps", type=int, default=None, help="max optimizer steps (default 100000 with --max-minutes)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation (default 100 CUDA, 10 CPU)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="validation windows per domain during training (default 64 CUDA, 8 CPU)")
    p.add_argument("--final-eval-windows", type=int, default=None, help="0 = whole valid split (default on CUDA)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--experts-impl", default=None, choices=("auto", *EXPERTS_FALLBACK),
                   help="transformers experts implementation; auto = fastest that passes the preflight "
                        "(default: auto on CUDA, eager on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on CPU: on a shared 2-core box OpenMP spinning "
                        "made index_add_ ~1000x slower with 2 threads than with 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", type=Path, default=REPO / "corpus_build")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "tiny_olmoe")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.steps is None and args.max_minutes is None:
        p.error("give --steps and/or --max-minutes")
    if args.steps is None:
        args.steps = 100_000
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 8
    if args.batch_size % 2:
        p.error("--batch-size must be even (half prose, half code)")
    if args.eval_every is None:
        args.eval_every = 100 if cuda else 10
    if args.log_every is None:
        args.log_every = 20 if cuda else 5
    if args.eval_windows is None:
        args.eval_windows = 64 if cuda else 8
    # Short runs (smoke tests) still reach the peak learning rate.
    args.warmup_steps = max(1, min(args.warmup_steps, args.steps // 10))
    if args.final_eval_windows is None:
        args.final_eval_windows = 0 if cuda else 16
    if args.experts_impl is None:
        args.experts_impl = "auto" if cuda else "eager"
    return args


class Logger:
    """Print and append JSON lines to ``training_log.jsonl``."""

    def __init__(self, path: Path):
        self.f = path.open("w", encoding="utf-8")

    def __call__(self, record: dict, text: str | None = None):
        self.f.write(json.dumps(record, sort_keys=True) + "\n")
        self.f.flush()
        print(text if text is not None else json.dumps(record), flush=True)


def load_tokens(corpus: Path, split: str, device) -> dict[str, torch.Tensor]:
    out = {}
    for domain in DOMAINS:
        path = corpus / f"tokens_{split}_{domain}.npy"
        if not path.is_file():
            sys.exit(f"train_tiny: error: {path} is missing; run scripts/build_corpus.py and scripts/train_tokenizer.py.")
        # int64 on the device: sampling windows is then a single gather, no host round trip.
        out[domain] = torch.from_numpy(np.load(path).astype(np.int64)).to(device)
    return out


def sample_batch(train: dict[str, torch.Tensor], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Balanced batch: ``batch_size // 2`` random windows of SEQ_LEN tokens from each domain."""
    rows = []
    half = batch_size // 2
    for domain in DOMAINS:
        data = train[domain]
        starts = torch.randint(0, data.numel() - SEQ_LEN, (half,), generator=gen, device=data.device)
        idx = starts[:, None] + torch.arange(SEQ_LEN, device=data.device)[None, :]  # (half, T)
        rows.append(data[idx])
    return torch.cat(rows, 0)  # (B, T)


def eval_windows(data: torch.Tensor, n_windows: int) -> torch.Tensor:
    """Non-overlapping SEQ_LEN windows of a split (0 = all full windows).

    A subset is spread evenly over the split, so the periodic validation (which picks the kept
    weights) sees many documents, not only the first few.
    """
    total = data.numel() // SEQ_LEN
    all_windows = data[: total * SEQ_LEN].view(total, SEQ_LEN)  # (total, T)
    if n_windows <= 0 or n_windows >= total:
        return all_windows
    idx = torch.linspace(0, total - 1, n_windows, device=data.device).round().long()
    return all_windows[idx]  # (n, T)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], device, batch: int) -> dict[str, float]:
    """Mean next-token cross-entropy per domain; every window has SEQ_LEN - 1 scored tokens,
    so the window mean is also the token-weighted mean."""
    was_training = model.training
    model.eval()
    res = {}
    for domain, w in windows.items():
        total, count = 0.0, 0
        for i in range(0, w.shape[0], batch):
            x = w[i : i + batch]
            with autocast(device):
                out = model(input_ids=x, labels=x, output_router_logits=False, use_cache=False)
            total += out.loss.float().item() * x.shape[0]
            count += x.shape[0]
        res[domain] = total / max(count, 1)
    model.train(was_training)
    return res


def z_loss(router_logits) -> torch.Tensor:
    """Router z-loss: mean over layers and tokens of logsumexp(logits)^2 (ST-MoE eq. 5)."""
    per_layer = [torch.logsumexp(lg.float(), dim=-1).pow(2).mean() for lg in router_logits]
    return torch.stack(per_layer).mean()


def train_loss(model, x: torch.Tensor, device):
    with autocast(device):
        out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
    if not isinstance(out.router_logits, tuple) or len(out.router_logits) != model.config.num_hidden_layers:
        raise RuntimeError(
            "OlmoeForCausalLM did not return one router-logits tensor per layer "
            f"(got {type(out.router_logits).__name__}); check the transformers version (5.23 expected)."
        )
    aux = out.aux_loss.float()
    ce = out.loss.float() - model.config.router_aux_loss_coef * aux  # out.loss already holds coef * aux
    z = z_loss(out.router_logits)
    return out.loss.float() + Z_LOSS_COEF * z, {"ce": ce, "aux": aux, "z": z}


def _time_steps(model, x, device, n: int = 3) -> float:
    """Seconds per forward+backward at the real batch size (no optimizer step)."""
    loss, _ = train_loss(model, x, device)
    loss.backward()  # warm-up (kernel selection, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        loss, _ = train_loss(model, x, device)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / n


def preflight(model, small_x: torch.Tensor, full_x: torch.Tensor, device, requested: str) -> str:
    """Check the experts implementation in forward AND backward against eager, and pick one.

    On an H100 with torch 2.11 the fused experts paths have returned NaN or hit device asserts in
    some configurations: check before training instead of training on garbage. ``requested="auto"``
    tries every implementation, times the ones that pass at the real batch size and keeps the
    fastest; an explicit choice that fails raises with the original error.
    """
    # batched_mm is left out of "auto": it gathers one weight matrix per (token, expert) pair,
    # tens of GB at a training batch, and it is the path that hit device asserts on an H100.
    candidates = ["grouped_mm", "eager"] if requested == "auto" else [requested]
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref, _ = train_loss(model, small_x, device)
    timings, errors = {}, {}
    for cand in candidates:
        try:
            model.set_experts_implementation(cand)
            loss, _ = train_loss(model, small_x, device)
            loss.backward()
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            model.zero_grad(set_to_none=True)
            if not torch.isfinite(loss).item() or bad:
                raise RuntimeError(f"non-finite loss ({loss.item()}) or gradients in {bad[:3]}")
            if abs(loss.item() - ref.item()) > 2e-2 * abs(ref.item()) + 1e-2:
                raise RuntimeError(f"loss {loss.item():.4f} disagrees with the eager reference {ref.item():.4f}")
            timings[cand] = _time_steps(model, full_x, device) if len(candidates) > 1 else float("nan")
            timing = f"; {timings[cand]:.3f} s per fwd+bwd at batch {full_x.shape[0]}" if len(candidates) > 1 else ""
            print(f"preflight: experts implementation {cand!r} OK in forward+backward (loss {loss.item():.4f}, "
                  f"eager {ref.item():.4f}){timing}", flush=True)
        except Exception as exc:  # reported verbatim: this is the GPU-debugging signal
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            errors[cand] = exc
            print(f"PREFLIGHT FAILURE: experts implementation {cand!r} failed in forward/backward: "
                  f"{type(exc).__name__}: {exc}", flush=True)
            if len(candidates) == 1:
                raise RuntimeError(
                    f"experts implementation {cand!r} failed the forward/backward preflight; "
                    "retry with `--experts-impl auto` (or `eager`)"
                ) from exc
    if not timings:
        raise RuntimeError(f"every experts implementation failed the forward/backward preflight: {errors}")
    chosen = min(timings, key=lambda k: timings[k]) if len(timings) > 1 else next(iter(timings))
    model.set_experts_implementation(chosen)
    print(f"preflight: training with experts implementation {chosen!r}", flush=True)
    return chosen


def lr_at(progress: float, step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers
    from transformers import OlmoeForCausalLM

    device = torch.device(args.device)
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log = Logger(args.out / "training_log.jsonl")

    train = load_tokens(args.corpus, "train", device)
    valid = load_tokens(args.corpus, "valid", device)
    windows = {d: eval_windows(valid[d], args.eval_windows) for d in DOMAINS}
    eval_batch = 64 if device.type == "cuda" else 8

    config = model_config()
    model = OlmoeForCausalLM._from_config(config, attn_implementation="sdpa")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"model: {n_params / 1e6:.2f} M parameters; device {device} ({device_name}); "
          f"batch {args.batch_size} x {SEQ_LEN}; torch {torch.__version__}, transformers {transformers.__version__}",
          flush=True)

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    impl = preflight(model, sample_batch(train, min(args.batch_size, 8), gen),
                     sample_batch(train, args.batch_size, gen), device, args.experts_impl)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )

    budget_s = args.max_minutes * 60 if args.max_minutes else math.inf
    model.train()
    t0 = time.perf_counter()
    tokens_seen = 0
    best = {"loss": math.inf, "step": 0, "state": None, "valid": None}
    step = 0
    last_t, last_tokens = t0, 0
    stop_reason = "steps"
    while step < args.steps:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            stop_reason = "max_minutes"
            break
        progress = max(step / args.steps, elapsed / budget_s)
        lr = lr_at(progress, step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(train, args.batch_size, gen)
        loss, parts = train_loss(model, x, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()

        if step % args.log_every == 0 or step == 1:
            now = time.perf_counter()
            tps = (tokens_seen - last_tokens) / max(now - last_t, 1e-9)
            last_t, last_tokens = now, tokens_seen
            rec = {"kind": "train", "step": step, "tokens": tokens_seen, "elapsed_s": round(now - t0, 2),
                   "lr": lr, "loss": loss.item(), "ce": parts["ce"].item(), "aux": parts["aux"].item(),
                   "z": parts["z"].item(), "grad_norm": float(gnorm), "tokens_per_s": round(tps)}
            if not math.isfinite(rec["loss"]):
                raise RuntimeError(f"non-finite training loss at step {step}: {rec}")
            log(rec, f"step {step:6d} | loss {rec['loss']:.4f} ce {rec['ce']:.4f} aux {rec['aux']:.4f} "
                     f"z {rec['z']:.3f} | lr {lr:.2e} | {tps / 1e3:8.1f} k tok/s | {rec['elapsed_s']:.0f} s")
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, windows, device, eval_batch)
            mean = sum(val.values()) / len(val)
            rec = {"kind": "valid", "step": step, "tokens": tokens_seen,
                   "elapsed_s": round(time.perf_counter() - t0, 2), **{f"valid_loss_{d}": v for d, v in val.items()}}
            log(rec, f"step {step:6d} | valid loss prose {val['prose']:.4f} code {val['code']:.4f}")
            if mean < best["loss"]:
                best = {"loss": mean, "step": step, "valid": val,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    train_s = time.perf_counter() - t0

    # Final check of the last weights, then keep the best ones (early stopping).
    val = evaluate(model, windows, device, eval_batch)
    mean = sum(val.values()) / len(val)
    log({"kind": "valid", "step": step, "tokens": tokens_seen, "elapsed_s": round(train_s, 2),
         **{f"valid_loss_{d}": v for d, v in val.items()}},
        f"step {step:6d} | final valid loss prose {val['prose']:.4f} code {val['code']:.4f}")
    if mean < best["loss"]:
        best = {"loss": mean, "step": step, "valid": val, "state": None}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    print(f"keeping the weights of step {best['step']} (best mean valid loss {best['loss']:.4f})", flush=True)

    # Full evaluation of the kept weights (whole valid split on CUDA).
    final_windows = {d: eval_windows(valid[d], args.final_eval_windows) for d in DOMAINS}
    final = evaluate(model, final_windows, device, eval_batch)
    final_info = {d: {"loss": final[d], "perplexity": math.exp(final[d]),
                      "windows": int(final_windows[d].shape[0]), "tokens_scored": int(final_windows[d].shape[0]) * (SEQ_LEN - 1)}
                  for d in DOMAINS}
    for d in DOMAINS:
        print(f"final valid {d}: loss {final[d]:.4f}, perplexity {math.exp(final[d]):.2f}", flush=True)

    # Save in bfloat16; the router-logits switch was only for training.
    model.config.output_router_logits = False
    model.config.use_cache = True
    model = model.to(torch.bfloat16).cpu().eval()
    model.save_pretrained(str(args.out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(args.tokenizer / name, args.out / name)
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6

    info = {
        "steps": step,
        "kept_step": best["step"],
        "stop_reason": stop_reason,
        "tokens_seen": tokens_seen,
        "train_tokens_available": {d: int(train[d].numel()) for d in DOMAINS},
        "epochs": tokens_seen / sum(int(train[d].numel()) for d in DOMAINS),
        "wall_time_s": round(train_s, 1),
        "tokens_per_s": round(tokens_seen / max(train_s, 1e-9)),
        "device": str(device),
        "device_name": device_name,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "experts_implementation": impl,
        "attn_implementation": "sdpa",
        "precision": "bf16 autocast, fp32 master weights" if device.type == "cuda" else "float32",
        "saved_dtype": "bfloat16",
        "model_safetensors_mb": round(size_mb, 2),
        "parameters": n_params,
        "hyperparameters": {
            "seq_len": SEQ_LEN, "batch_size": args.batch_size, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
            "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "betas": [0.9, 0.95],
            "grad_clip": 1.0, "router_aux_loss_coef": config.router_aux_loss_coef, "router_z_loss_coef": Z_LOSS_COEF,
            "schedule": "linear warmup + cosine on max(step/steps, elapsed/max_minutes)",
            "sampling": "balanced: half the sequences prose, half code, uniform random offsets",
            "max_steps": args.steps, "max_minutes": args.max_minutes, "seed": args.seed,
        },
        "final_validation": final_info,
        "validation_protocol": (f"non-overlapping {SEQ_LEN}-token windows of each valid split (all of them, or "
                                "a subset spread evenly over the split), each scored independently "
                                f"({SEQ_LEN - 1} predicted tokens per window), token-weighted mean"),
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(f"saved {args.out} (model.safetensors {size_mb:.1f} MB); {tokens_seen / 1e6:.1f} M tokens in "
          f"{train_s:.0f} s = {info['tokens_per_s'] / 1e3:.1f} k tok/s", flush=True)


if __name__ == "__main__":
    main()
