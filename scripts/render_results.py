"""The measurement tables of README.md and docs/*.md, rendered from the committed results files (never typed by hand).

Each block sits on one page (README.md or a page under ``docs/``, found by its markers) between
``<!-- NAME: python scripts/render_results.py -->`` and ``<!-- end NAME -->`` and names its source
file(s) under it, linked relative to that page. ``benchmarks/results/INDEX.md`` says which file
backs which block (its ``block`` column) and how to regenerate that file.

Usage::

    python scripts/render_results.py           # rewrite every block, on whichever page holds it
    python scripts/render_results.py --check   # exit 1 naming the blocks that differ from the files
    python scripts/render_results.py --print gpu   # one block to stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from _readme import page_with, pages, relative_links, replace_section  # scripts/ is on sys.path when a script runs
from _results import INDEX, ROOT, block_files, index_rows  # noqa: F401  (index_rows: for the test)

COMMAND = "python scripts/render_results.py"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' own table code


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def statistics(files: list[Path]) -> str:
    """Cost of the per-token statistic in the fused selector (``bench_statistics.py``)."""
    data = _json(files[0])
    lines = [f"On one {data['gpu']} (torch {data['torch']}, transformers {data['transformers']}):", "",
             "| tokens x 64 | softmax+topk(8) | fused BH raw | centred | zscore |", "|---:|---:|---:|---:|---:|"]
    for n, row in data["selector"].items():
        ratios = " | ".join(f"{row[f'fused bh {s}']['x_softmax_topk']:.2f}x" for s in ("raw", "centred", "zscore"))
        lines.append(f"| {int(n):,} | {row['softmax+topk8']['us']:.1f} us | {ratios} |")
    return "\n".join(lines)


def adaptive(files: list[Path]) -> str:
    """Inverse-p weights and alpha per layer (``bench_adaptive_fdr.py``, bfloat16 and emulated T4)."""
    from bench_adaptive_fdr import render

    return render(*(_json(p) for p in files))


def reliability(files: list[Path]) -> str:
    """The fault battery (``scripts/reliability.py``)."""
    from reliability import render

    return render(_json(files[0]))


def t4(files: list[Path]) -> str:
    """The Colab T4 emulation (``t4_emulation.py``)."""
    from t4_emulation import render

    return render(_json(files[0]))


def gpu(files: list[Path]) -> str:
    """Route and selector speed on an H100 (``bench_gpu.py``)."""
    from bench_gpu import model_table, selector_table

    data = _json(files[0])
    meta = data["meta"]
    return "\n".join([
        f"{meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
        f"{meta['layers']} layers, prefill {meta['prefill'][0]} x {meta['prefill'][1]} tokens, decode "
        f"{meta['new_tokens']} new tokens:", "",
        *model_table(data["model"]), "",
        "The selector alone against `softmax + topk(8)` (64 experts, same run; \"identical\": same indices and "
        "counts as the plain-torch reference BH):", "",
        *selector_table(data["selector"]),
    ])


def k_scaling(files: list[Path]) -> str:
    """Time against k on the T4 and bf16 paths (``k_scaling.py``), one file per path run."""
    from k_scaling import render

    return "\n\n".join(render(_json(p)) for p in files)


def t4_projection(files: list[Path]) -> str:
    """The cost model checked on the measuring GPU, projected onto a T4 (``t4_projection.py``)."""
    from t4_projection import render

    return render(_json(files[0]))


BLOCKS: dict[str, Callable[[list[Path]], str]] = {
    "statistics": statistics, "adaptive": adaptive, "reliability": reliability, "t4": t4, "gpu": gpu,
    "k_scaling": k_scaling, "t4_projection": t4_projection,
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: {COMMAND} -->", f"<!-- end {name} -->"


def render(name: str, page: Path | None = None) -> str:
    """Block ``name`` with its markers and a line naming its source files, linked relative to ``page``."""
    files = block_files(name)
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise SystemExit(f"{INDEX.relative_to(ROOT)} names missing files: {', '.join(map(str, missing))}")
    sources = " and ".join(f"[`{p.relative_to(ROOT).as_posix()}`]({p.relative_to(ROOT).as_posix()})" for p in files)
    start, end = markers(name)
    block = "\n".join([start, BLOCKS[name](files), "", f"Source: {sources} (rendered by `{COMMAND}`).", end])
    return relative_links(block, page or ROOT / "README.md")


def read_pages() -> dict[Path, str]:
    """Every page that may hold a block, with its text."""
    return {p: p.read_text(encoding="utf-8") for p in pages()}


def stale(texts: dict[Path, str] | None = None) -> list[str]:
    """Names of the blocks whose text differs from their rendering, or that are not on exactly one page."""
    texts = read_pages() if texts is None else texts
    out = []
    for name in BLOCKS:
        start, end = markers(name)
        holders = [p for p, t in texts.items() if start in t and end in t]
        if len(holders) != 1 or replace_section(texts[holders[0]], start, end, render(name, holders[0])) != \
                texts[holders[0]]:
            out.append(name)
    return out


def write(names: list[str] | None = None) -> None:
    for name in names or list(BLOCKS):
        start, end = markers(name)
        page = page_with(start)
        text = page.read_text(encoding="utf-8")
        page.write_text(replace_section(text, start, end, render(name, page)), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare README.md with the committed files")
    parser.add_argument("--print", dest="show", choices=sorted(BLOCKS), help="print one block")
    args = parser.parse_args(argv)
    if args.show:
        print(render(args.show))
        return 0
    if args.check:
        names = stale()
        if names:
            print(f"blocks {', '.join(names)} of README.md / docs/*.md differ from the results files named in "
                  f"{INDEX.relative_to(ROOT)}: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
