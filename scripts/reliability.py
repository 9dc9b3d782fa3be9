"""The README's reliability figure, from a run of the fault battery (``pytest -m fault``).

Every test marked ``@pytest.mark.fault(group, outcome)`` is one bad input or fault: a damaged
file, a second process on one folder, a Ctrl-C, a broken selector, untrusted model code, a bad
option. A test that passes has shown its outcome ("clear error" or "recovered") and, where it
applies, that nothing was written or lost; one that fails is counted as "failed" (silently wrong
or lost until shown otherwise). GPU-only cases skipped on this machine are counted apart.

Usage::

    python scripts/reliability.py           # run the battery, write results, figure, README
    python scripts/reliability.py --check   # README section == rendering of the committed results

The results go to ``benchmarks/results/reliability_cpu_<commit>.json``, which replaces the file
``benchmarks/results/INDEX.md`` named (INDEX is updated); the README section is rendered by
``scripts/render_results.py`` like every measurement table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from _results import block_files, replace_in_index, result_path  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "reliability.png"
COLUMNS = ("clear error", "recovered", "failed", "skipped")


def run_battery() -> dict:
    """Run ``pytest -m fault`` and return ``{"tests": {nodeid: record}, "exit": int}``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "fault", "-p", "no:cacheprovider", "tests",
             f"--fault-report={report}"], cwd=ROOT, env=env, check=False,
        )
        data = json.loads(report.read_text(encoding="utf-8"))
    data["exit"] = proc.returncode
    return data


def tally(data: dict) -> dict[str, Counter]:
    """Per group, the number of cases by column (an expected outcome when passed, else the result)."""
    groups: dict[str, Counter] = {}
    for record in data["tests"].values():
        column = record["expected"] if record["result"] == "passed" else record["result"]
        groups.setdefault(record["group"], Counter())[column] += 1
    return dict(sorted(groups.items()))


def render(data: dict) -> str:
    """The README section inside its markers (a table and the figure), from ``data``."""
    groups = tally(data)
    total = Counter()
    for counts in groups.values():
        total.update(counts)
    ran = sum(total[c] for c in COLUMNS[:3])
    lines = [
        f"{ran} bad inputs and faults tried on CPU ({total['skipped']} more need a GPU), as "
        f"`{data['command']}` on {data['when']}: **{total['clear error']} clear errors, "
        f"{total['recovered']} recovered, {total['failed']} silently wrong or lost**. "
        "Each is a test marked `@pytest.mark.fault`; a passing test has shown a one-line error naming "
        "the option and the fix, or a completed run, with nothing the user had changed.",
        "",
        f"![Fault battery: {ran} cases by group and outcome]({FIGURE.relative_to(ROOT).as_posix()})",
        "",
        "| group | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for group, counts in groups.items():
        lines.append(f"| {group} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
    lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Horizontal stacked bars: cases per group, coloured by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    groups = tally(data)
    names = list(groups)
    colours = dict(zip(COLUMNS, sns.color_palette("colorblind", 4)))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.4))
    left = [0] * len(names)
    labels = {"failed": "failed (silently wrong or lost)"}
    for column in COLUMNS[:3]:
        values = [groups[g][column] for g in names]
        ax.barh(names, values, left=left, color=colours[column], label=labels.get(column, column))
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("cases (tests marked fault)")
    total = Counter()
    for counts in groups.values():
        total.update(counts)
    ax.set_title(f"Fault battery on CPU: {sum(left)} cases, {total['failed']} silently wrong or lost", fontsize=10)
    ax.legend(loc="lower right", frameon=False)
    sns.despine(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare README with the committed results only")
    args = parser.parse_args(argv)
    import render_results

    if args.check:
        return render_results.main(["--check"])
    import datetime

    data = run_battery()
    data["command"] = "pytest -m fault"
    data["when"] = datetime.date.today().isoformat()
    old, new = block_files("reliability")[0], result_path("reliability", "cpu")
    new.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if old != new:
        old.unlink(missing_ok=True)
        replace_in_index(old.name, new.name)
    plot(data, FIGURE)
    render_results.write(["reliability"])
    print(render(data))
    return 0 if data["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
