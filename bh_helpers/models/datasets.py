"""Evaluation data sets as plain Python lists in one normalised format.

On the models floor beside the embedded corpus, so that :mod:`bh_helpers.models.texts` (and every floor
above) can read them.

=============  ===================================  ==========================================
name           normalised format                    hub source (``datasets.load_dataset``)
=============  ===================================  ==========================================
``wikitext2``  ``list[str]`` (one per article)      ``"Salesforce/wikitext"`` (``"wikitext"``),
                                                    config ``"wikitext-2-raw-v1"``
``lambada``    ``list[{"text"}]``                   ``"EleutherAI/lambada_openai"`` (``"lambada"``
                                                    as a fallback)
``hellaswag``  ``list[{"context","endings","label"}]``  ``"Rowan/hellaswag"``
=============  ===================================  ==========================================

Every loader also takes ``path=``, a local ``.txt`` or ``.jsonl`` file in the hub rows' format,
which needs neither the ``datasets`` library nor the network. :func:`embedded_fixture` returns
small committed fixtures built from the embedded corpus (``scripts/build_fixtures.py``) in the
same formats; the tests use only those and local files.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS",
    "FIXTURES",
    "load_wikitext2",
    "load_lambada",
    "load_hellaswag",
    "embedded_fixture",
    "hellaswag_preprocess",
]

FIXTURE_DIR = Path(str(importlib.resources.files("bh_helpers") / "data" / "fixtures"))
FIXTURES = {
    "wikitext2": "wikitext_style.txt",
    "lambada": "lambada_style.jsonl",
    "hellaswag": "hellaswag_style.jsonl",
}

# A top-level WikiText heading line, e.g. " = Valkyria Chronicles III = " (not " = = Sub = = ").
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


# ----------------------------------------------------------------------------------------------
# File and hub access
# ----------------------------------------------------------------------------------------------


def _check_path(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`path` {str(p)!r} is not a file; pass a local .txt or .jsonl file.")
    if p.suffix not in (".txt", ".jsonl", ".json"):
        raise ValueError(f"`path` {str(p)!r} must end in .txt or .jsonl, got {p.suffix!r}.")
    return p


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg}).") from None
    return rows


def _hub_rows(candidates: Iterable[tuple[str, str | None]], split: str) -> list[dict]:
    """Rows of the first hub data set in ``candidates`` that loads."""
    try:
        import datasets as hf_datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading from the Hugging Face hub needs the `datasets` package "
            "(pip install 'bh-routing[notebooks]'), or pass `path=` to a local file."
        ) from err
    errors = []
    for name, config in candidates:
        try:
            ds = hf_datasets.load_dataset(name, config, split=split)
        except Exception as err:  # noqa: BLE001 - try the next source, report all at the end
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        return [dict(row) for row in ds]
    raise RuntimeError(
        "could not load any of the hub sources (offline? pass `path=` to a local file, or use "
        "bh_helpers.models.datasets.embedded_fixture):\n  " + "\n  ".join(errors)
    )


# ----------------------------------------------------------------------------------------------
# WikiText-2
# ----------------------------------------------------------------------------------------------


def _wikitext_articles(lines: list[str]) -> list[str]:
    """Join WikiText rows (each ending in "\\n", as on the hub) into one string per article."""
    articles: list[list[str]] = []
    for line in lines:
        if _WIKI_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    texts = ["".join(a) for a in articles]
    return [t for t in texts if t.strip()]


def load_wikitext2(split: str = "test", *, path: str | Path | None = None) -> list[str]:
    """WikiText-2 (raw) as a list of articles.

    Parameters
    ----------
    split : str
        Hub split: ``"test"``, ``"validation"`` or ``"train"``.
    path : str or Path, optional
        Local file instead of the hub: a ``.txt`` raw file (such as ``wiki.test.raw``) or a
        ``.jsonl`` of ``{"text": ...}`` rows, one hub row each.

    Returns
    -------
    list of str
        One string per article (split at top-level `` = Title = `` headings), each the exact
        concatenation of its rows, so joining the list gives back the original text; articles
        of blank lines only are dropped.
    """
    if path is not None:
        p = _check_path(path)
        if p.suffix == ".txt":
            lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
        else:
            lines = [str(r["text"]) for r in _read_jsonl(p)]
    else:
        sources = [("Salesforce/wikitext", "wikitext-2-raw-v1"), ("wikitext", "wikitext-2-raw-v1")]
        lines = [str(r["text"]) for r in _hub_rows(sources, split)]
    return _wikitext_articles(lines)


# ----------------------------------------------------------------------------------------------
# LAMBADA
# ----------------------------------------------------------------------------------------------


def load_lambada(split: str = "test", *, path: str | Path | None = None) -> list[dict]:
    """LAMBADA (OpenAI's detokenized test set) as ``[{"text": ...}]``.

    Parameters
    ----------
    split : str
        Hub split (``"test"``; ``EleutherAI/lambada_openai`` has only that one).
    path : str or Path, optional
        Local ``.txt`` (one passage per line) or ``.jsonl`` of ``{"text": ...}`` rows.

    Returns
    -------
    list of dict
        ``{"text": passage}``; the target is the passage's last whitespace-separated word.
    """
    if path is not None:
        p = _check_path(path)
        if p.suffix == ".txt":
            texts = p.read_text(encoding="utf-8").splitlines()
        else:
            texts = [str(r["text"]) for r in _read_jsonl(p)]
    else:
        rows = _hub_rows([("EleutherAI/lambada_openai", "default"), ("lambada", None)], split)
        texts = [str(r["text"]) for r in rows]
    return [{"text": t.strip()} for t in texts if t.strip()]


# ----------------------------------------------------------------------------------------------
# HellaSwag
# ----------------------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow ``[title]`` and bracket artefacts).

    Reproduced as is, including its single pass of double-space removal.

    Examples
    --------
    >>> hellaswag_preprocess("How to cook [title] Boil water. [step] Wait")
    'How to cook. Boil water. Wait'
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_row(row: Mapping[str, Any]) -> dict:
    if "context" in row:  # already normalised
        return {"context": str(row["context"]), "endings": list(row["endings"]), "label": int(row["label"])}
    label = row.get("label", "")
    if label in ("", None):
        raise ValueError("HellaSwag rows without a label (the hub's test split) cannot be scored.")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    activity = row.get("activity_label", "")
    query = activity + ": " + ctx if activity else ctx
    return {
        "context": hellaswag_preprocess(query),
        "endings": [hellaswag_preprocess(e) for e in row["endings"]],
        "label": int(label),
    }


def load_hellaswag(split: str = "validation", *, path: str | Path | None = None) -> list[dict]:
    """HellaSwag as ``[{"context", "endings", "label"}]``, preprocessed as in lm-eval.

    Parameters
    ----------
    split : str
        Hub split; ``"validation"`` (the test split has no labels).
    path : str or Path, optional
        Local ``.jsonl`` of hub rows (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``,
        ``label``); rows already in the normalised format are accepted too.

    Returns
    -------
    list of dict
        ``context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``,
        ``endings = [preprocess(e) ...]``, ``label`` an int.
    """
    if path is not None:
        p = _check_path(path)
        if p.suffix == ".txt":
            raise ValueError(f"`path` for hellaswag must be a .jsonl of hub rows, got {str(p)!r}.")
        rows = _read_jsonl(p)
    else:
        rows = _hub_rows([("Rowan/hellaswag", None)], split)
    return [_hellaswag_row(r) for r in rows]


# ----------------------------------------------------------------------------------------------
# By name
# ----------------------------------------------------------------------------------------------

DATASETS: dict[str, tuple[Callable[..., list], str]] = {
    "wikitext2": (load_wikitext2, "test"),
    "lambada": (load_lambada, "test"),
    "hellaswag": (load_hellaswag, "validation"),
}
_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "lambada_openai": "lambada"}


def _canonical(name: str) -> str:
    key = str(name).lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set `name`={name!r}; known names: {sorted(DATASETS)}.")
    return key


def embedded_fixture(name: str) -> list:
    """A small committed fixture in ``name``'s normalised format (no network, no ``datasets``).

    The fixtures are built from the embedded corpus's evaluation slice by
    ``scripts/build_fixtures.py``: a few hundred examples at most.

    Raises
    ------
    ValueError
        For an unknown ``name``.
    FileNotFoundError
        When the fixture has not been built into this checkout.
    """
    key = _canonical(name)
    path = FIXTURE_DIR / FIXTURES[key]
    if not path.is_file():
        raise FileNotFoundError(f"fixture {path} is missing; build it with scripts/build_fixtures.py.")
    loader, default_split = DATASETS[key]
    return loader(default_split, path=path)
