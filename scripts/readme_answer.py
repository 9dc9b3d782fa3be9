"""The answer section of docs/results.md, regenerated from a demo report (never written by hand).

Usage::

    bh-routing demo --out bh_routing_output             # the numbers (about 5 minutes on 2 CPU cores)
    python scripts/readme_answer.py --from bh_routing_output   # copy report + figure to docs/, rewrite the section
    python scripts/readme_answer.py --check                     # the section == rendering of docs/demo_report.md

The section holds the report's ``## Verdict``, ``## Against compute-matched controls`` and (when
the report has it) ``## Task accuracy beside perplexity`` as the demo wrote them, the controls
figure, and the run's settings and wall time (``steps.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _readme import page_with, relative_links, replace_section  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "demo_report.md"
FIGURE = ROOT / "docs" / "demo_controls.png"
RUN = ROOT / "docs" / "demo_run.json"
START, END = "<!-- answer: python scripts/readme_answer.py -->", "<!-- end answer -->"
SECTIONS = ("## Verdict", "## Against compute-matched controls")
TASKS = "## Task accuracy beside perplexity"  # copied too when the report has it


def _section(report: str, heading: str) -> str:
    """The body of one ``## `` section of the report (without its heading)."""
    if heading not in report:
        raise SystemExit(f"{REPORT} has no {heading!r} section: was the demo run with controls?")
    body = report.split(heading + "\n", 1)[1]
    return body.split("\n## ", 1)[0].strip()


def render() -> str:
    report = REPORT.read_text(encoding="utf-8")
    run = json.loads(RUN.read_text(encoding="utf-8"))
    s = run["settings"]
    seconds = sum(run["seconds"].values())
    settings = (f"`bh-routing demo` with its defaults (embedded model, {run['dtype']} on {run['device']}, "
                f"{seconds / 60:.1f} min wall on the shared 2-core machine): statistics {', '.join(s['statistics'])}, "
                f"trims {', '.join(map(str, s['trims']))}, floors min_k {', '.join(map(str, s['min_ks']))}, compute "
                f"targets mean k {', '.join(map(str, s['mean_ks']))}, {s['max_tokens']:,} evaluation tokens per data set "
                f"({', '.join(s['datasets'])}), windows of {s['window']} tokens. The full report is "
                f"[docs/demo_report.md](docs/demo_report.md).")
    return relative_links("\n".join([
        START, settings, "", _section(report, SECTIONS[0]), "",
        f"![adaptive rows against their compute-matched controls]({FIGURE.relative_to(ROOT).as_posix()})", "",
        _section(report, SECTIONS[1]),
        *(["", "**Task accuracy beside perplexity.** " + _section(report, TASKS)] if TASKS in report else []), END,
    ]), page_with(START))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default=None, help="demo output folder to copy from")
    parser.add_argument("--check", action="store_true", help="only compare README with docs/demo_report.md")
    args = parser.parse_args(argv)
    page = page_with(START)  # README.md or the docs/ page that holds the answer block
    if args.check:
        current = page.read_text(encoding="utf-8")
        if replace_section(current, START, END, render()) != current:
            print(f"the answer section of {page.relative_to(ROOT)} is stale: run python scripts/readme_answer.py",
                  file=sys.stderr)
            return 1
        return 0
    if args.source:
        src = Path(args.source)
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        text = (src / "report.md").read_text(encoding="utf-8")
        REPORT.write_text(text.replace("](", "](demo_report_files/"), encoding="utf-8")
        figures = REPORT.parent / "demo_report_files"
        figures.mkdir(exist_ok=True)
        for png in src.glob("*.png"):
            shutil.copyfile(png, figures / png.name)
        shutil.copyfile(src / "against_compute-matched_controls.png", FIGURE)
        settings = json.loads((src / "run.json").read_text(encoding="utf-8"))
        steps = json.loads((src / "steps.json").read_text(encoding="utf-8"))
        RUN.write_text(json.dumps({**steps, "settings": settings["settings"]}, indent=2) + "\n", encoding="utf-8")
    page.write_text(replace_section(page.read_text(encoding="utf-8"), START, END, render()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
