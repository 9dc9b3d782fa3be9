"""The answer sections of docs/results.md, regenerated from demo reports (never written by hand).

Usage::

    bh-routing demo --out bh_routing_output             # the numbers (about 5 minutes on 2 CPU cores)
    python scripts/readme_answer.py --from bh_routing_output   # copy report + figure to docs/, rewrite the section
    python scripts/readme_answer.py --full --from full_protocol  # the same for the full protocol's run
    python scripts/readme_answer.py --check                     # both sections == renderings of the copies

The demo's section holds the report's ``## Verdict``, ``## Against compute-matched controls`` and
(when the report has it) ``## Task accuracy beside perplexity`` as the demo wrote them, the controls
figure, and the run's settings and wall time (``steps.json``). The full protocol's section (its
report is long) holds the settings, the verdict and the static control against uniform top-k, and
links to the whole report (``docs/full_protocol_report.md``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from _readme import page_with, relative_links, replace_section  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SECTIONS = ("## Verdict", "## Against compute-matched controls")
TASKS = "## Task accuracy beside perplexity"  # copied too when the report has it
STATIC = "## The static control against uniform top-k"


@dataclass(frozen=True)
class Answer:
    """One generated section: the report copied under docs/, the run's settings and its markers."""

    name: str  # demo_report or full_protocol_report
    start: str
    end: str

    @property
    def report(self) -> Path:
        return DOCS / f"{self.name}.md"

    @property
    def run(self) -> Path:
        return DOCS / f"{self.name.removesuffix('_report')}_run.json"

    @property
    def files(self) -> Path:
        return DOCS / f"{self.name}_files"


DEMO = Answer("demo_report", "<!-- answer: python scripts/readme_answer.py -->", "<!-- end answer -->")
FULL = Answer("full_protocol_report", "<!-- full protocol: python scripts/readme_answer.py --full -->",
              "<!-- end full protocol -->")
FIGURE = DOCS / "demo_controls.png"


def _section(report: str, heading: str, answer: Answer = DEMO) -> str:
    """The body of one ``## `` section of the report (without its heading)."""
    if heading not in report:
        raise SystemExit(f"{answer.report} has no {heading!r} section: was the demo run with controls?")
    body = report.split(heading + "\n", 1)[1]
    return body.split("\n## ", 1)[0].strip()


_TARGETS = {"global": "each reached with one alpha over all layers",
            "per-layer": "each reached with one alpha per layer",
            "both": "each reached with one alpha over all layers, and with one per layer"}


def _settings(run: dict, report: str) -> str:
    s = run["settings"]
    budgets = ", and with the static allocation's per-layer budgets" if "static-budget" in report else ""
    return (f"statistics {', '.join(s['statistics'])}, trims {', '.join(map(str, s['trims']))}, floors min_k "
            f"{', '.join(map(str, s['min_ks']))}, compute targets mean k {', '.join(map(str, s['mean_ks']))}"
            f" ({_TARGETS[s['layer_targets']]}{budgets}), "
            f"{s['max_tokens']:,} evaluation tokens per data set ({', '.join(s['datasets'])}), windows of "
            f"{s['window']} tokens")


def _read(answer: Answer) -> tuple[str, dict, float]:
    """The copied report, its run's settings and steps, and the run's wall seconds."""
    run = json.loads(answer.run.read_text(encoding="utf-8"))
    return answer.report.read_text(encoding="utf-8"), run, sum(run["seconds"].values())


def render() -> str:
    report, run, seconds = _read(DEMO)
    settings = (f"`bh-routing demo` with its defaults (embedded model, {run['dtype']} on {run['device']}, "
                f"{seconds / 60:.1f} min wall on the shared 2-core machine): {_settings(run, report)}. The full report is "
                f"[docs/demo_report.md](docs/demo_report.md).")
    return relative_links("\n".join([
        DEMO.start, settings, "", _section(report, SECTIONS[0]), "",
        f"![adaptive rows against their compute-matched controls]({FIGURE.relative_to(ROOT).as_posix()})", "",
        _section(report, SECTIONS[1]),
        *(["", "**Task accuracy beside perplexity.** " + _section(report, TASKS)] if TASKS in report else []), DEMO.end,
    ]), page_with(DEMO.start))


def render_full() -> str:
    report, run, seconds = _read(FULL)
    settings = (f"The full protocol (embedded model, {run['dtype']} on {run['device']}; its last invocation "
                f"{seconds / 60:.0f} min wall): {_settings(run, report)}; every document of each half. The whole report "
                f"is [docs/full_protocol_report.md](docs/full_protocol_report.md).")
    parts = [FULL.start, settings, "", _section(report, SECTIONS[0], FULL)]
    if STATIC in report:
        parts += ["", "**The static control against uniform top-k.** " + _section(report, STATIC, FULL)]
    return relative_links("\n".join([*parts, FULL.end]), page_with(FULL.start))


def copy_run(src: Path, answer: Answer) -> None:
    """Copy a demo folder's report (figure links into ``<name>_files/``), figures and settings to docs/."""
    text = (src / "report.md").read_text(encoding="utf-8")
    answer.report.write_text(text.replace("](", f"]({answer.files.name}/"), encoding="utf-8")
    answer.files.mkdir(exist_ok=True)
    for png in src.glob("*.png"):
        shutil.copyfile(png, answer.files / png.name)
    settings = json.loads((src / "run.json").read_text(encoding="utf-8"))
    steps = json.loads((src / "steps.json").read_text(encoding="utf-8"))
    answer.run.write_text(json.dumps({**steps, "settings": settings["settings"]}, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default=None, help="demo output folder to copy from")
    parser.add_argument("--full", action="store_true", help="the full protocol's section (--from its folder)")
    parser.add_argument("--check", action="store_true", help="only compare the sections with their reports")
    args = parser.parse_args(argv)
    answers = [(DEMO, render)] + ([(FULL, render_full)] if FULL.report.is_file() else [])
    if args.check:
        stale = []
        for answer, rendering in answers:
            page = page_with(answer.start)  # README.md or the docs/ page that holds the block
            current = page.read_text(encoding="utf-8")
            if replace_section(current, answer.start, answer.end, rendering()) != current:
                stale.append(f"{answer.name} in {page.relative_to(ROOT)}")
        if stale:
            print(f"stale answer sections: {', '.join(stale)}: run python scripts/readme_answer.py", file=sys.stderr)
            return 1
        return 0
    answer, rendering = (FULL, render_full) if args.full else (DEMO, render)
    if args.source:
        copy_run(Path(args.source), answer)
        if answer is DEMO:
            shutil.copyfile(Path(args.source) / "against_compute-matched_controls.png", FIGURE)
    page = page_with(answer.start)
    page.write_text(replace_section(page.read_text(encoding="utf-8"), answer.start, answer.end, rendering()),
                    encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
