"""Texts that feed the model: calibration tokens for capture, evaluation documents by data-set name.

Evaluation data sets (:data:`EVAL_DATASETS`): ``prose`` and ``code`` are the two domains of the
embedded corpus's evaluation slice (held out from training and from calibration), ``wikitext2``
the real WikiText-2 test split (through ``datasets``, from the hub), ``wikitext2-fixture`` the
embedded WikiText-style sample (offline; named apart so that no table calls it WikiText-2); a
path to a UTF-8 ``.txt`` file is used as one document.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from bh_helpers._validate import check_choice, check_int, existing_file
from bh_helpers.models.datasets import embedded_fixture, load_wikitext2
from bh_helpers.models.loading import load_corpus_slice

__all__ = [
    "EVAL_DATASETS",
    "MIN_CALIBRATION_TEXT_TOKENS",
    "SPLITS",
    "calibration_texts",
    "calibration_token_ids",
    "check_datasets",
    "corpus_texts",
    "data_file_sha256",
    "dataset_description",
    "encode",
    "eos_id",
    "read_text_file",
    "evaluation_texts",
    "split_name",
]

EVAL_DATASETS = ("prose", "code", "wikitext2", "wikitext2-fixture")


def eos_id(tokenizer) -> int:
    """The tokenizer's end-of-sequence id, which separates documents (``ValueError`` when it has none)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer defines no eos_token_id, which separates documents.")
    return int(eos)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no length warning for long documents)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file; ValueError naming it when it is missing, not UTF-8 or empty."""
    path = existing_file("text file", path, missing="check the path (a UTF-8 .txt file).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"text file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); pass a plain-text file."
        ) from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty; give it some text to evaluate or calibrate on.")
    return text


def calibration_token_ids(tokenizer, *, max_tokens: int, text_file: str | os.PathLike | None = None) -> list[int]:
    """Calibration tokens: the embedded calibration slice (half prose, half code) or a text file.

    Documents are joined with EOS; from the embedded slice the first ``max_tokens // 2`` tokens
    of each domain are taken (prose first), from a file its first ``max_tokens`` tokens.

    Raises
    ------
    ValueError
        Non-positive ``max_tokens``, or a missing or empty ``text_file``.
    """
    max_tokens = check_int("max_tokens", max_tokens, 1)
    eos = eos_id(tokenizer)
    if text_file is not None:
        return encode(tokenizer, read_text_file(Path(text_file)))[:max_tokens]
    out: list[int] = []
    for domain, budget in (("prose", max_tokens // 2), ("code", max_tokens - max_tokens // 2)):
        stream: list[int] = []
        for rec in load_corpus_slice("calibration", domain=domain):
            if len(stream) >= budget:
                break
            stream += encode(tokenizer, rec["text"]) + [eos]
        out += stream[:budget]
    if not out or all(i == eos for i in out):  # a tokenizer that turns text into nothing: every window would be EOS
        raise ValueError("the tokenizer turned the calibration text into no tokens (only end-of-text markers); the "
                         "model folder's tokenizer files (tokenizer.json, tokenizer_config.json) are probably missing: "
                         "copy them from the model's source, or pass the hub id as --model.")
    return out


#: What each data-set name stands for, as reports state it.
_DESCRIPTIONS = {
    "prose": "embedded corpus, evaluation slice, prose",
    "code": "embedded corpus, evaluation slice, code",
    "wikitext2": "WikiText-2 (raw), test split, from the Hugging Face hub",
    "wikitext2-fixture": "embedded WikiText-style fixture (a sample, not WikiText-2)",
}


#: Suffixes that split a data set by document: ``"prose:tune"`` holds documents 0, 2, 4, ... of
#: ``"prose"``, ``"prose:confirm"`` documents 1, 3, 5, ... (configurations are chosen on the tuning
#: half and the verdict is stated on the confirmation half, never used for choosing).
SPLITS = ("tune", "confirm")


def split_name(name: str, split: str) -> str:
    """``name`` restricted to one half of its documents: ``split_name("prose", "tune") == "prose:tune"``."""
    check_choice("split", split, SPLITS)
    return f"{name}:{split}"


def _dataset_documents(name: str) -> tuple[list[str], str]:
    base, sep, split = name.rpartition(":")
    if sep and split in SPLITS:
        docs, description = _dataset_documents(base)
        half = docs[SPLITS.index(split)::2]
        if not half:
            raise ValueError(f"data set {base!r} has too few documents to split into tuning and confirmation halves "
                             "(a .txt file is one document): turn the split off (`split=False`), or use a data set of two "
                             "documents or more.")
        which = "even" if split == "tune" else "odd"
        return half, f"{description}, {split} half ({which}-numbered documents, {len(half)} of {len(docs)})"
    if name in ("prose", "code"):
        return [r["text"] for r in load_corpus_slice("evaluation", domain=name)], _DESCRIPTIONS[name]
    if name == "wikitext2":
        try:
            return load_wikitext2("test"), _DESCRIPTIONS[name]
        except (ImportError, RuntimeError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = (lines[1] if len(lines) > 1 else lines[0])[:200]  # the first source's own error
            raise ValueError(
                f"--datasets wikitext2 is the real WikiText-2 test split, loaded from the Hugging Face hub by the "
                f"datasets package, which failed here ({reason}); offline, use --datasets wikitext2-fixture (the "
                "embedded WikiText-style sample, not WikiText-2)."
            ) from None
    if name == "wikitext2-fixture":
        return list(embedded_fixture("wikitext2")), _DESCRIPTIONS[name]
    path = Path(name)
    if path.suffix == ".txt" and path.exists():
        return [read_text_file(path)], dataset_description(name)
    raise ValueError(
        f"unknown data set {name!r}; use one of {list(EVAL_DATASETS)} or a path to an existing .txt file."
    )


def data_file_sha256(name: str) -> str | None:
    """sha256 of the bytes of a data set that is a ``.txt`` file (``"notes.txt"``, ``"notes.txt:tune"``), else None.

    A file is named by its path only, so the hash is what tells its text apart: it enters a sweep's
    identity (:func:`bh_helpers.experiments.evaluate.sweep_grid_id`), so that a file replaced between
    a run and its resume is refused instead of mixing two texts in one results file.
    """
    import hashlib

    base, sep, split = name.rpartition(":")
    path = Path(base if sep and split in SPLITS else name)
    if path.suffix != ".txt" or not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_description(name: str) -> str:
    """What a data-set name stands for, as reports state it (a ``.txt`` path is "file <path> (sha256
    <first 12 hex digits>)", anything else unknown its own name)."""
    base, sep, split = name.rpartition(":")
    if sep and split in SPLITS:
        return f"{dataset_description(base)}, {split} half ({'even' if split == 'tune' else 'odd'}-numbered documents)"
    if name in _DESCRIPTIONS:
        return _DESCRIPTIONS[name]
    digest = data_file_sha256(name)
    return f"file {name} (sha256 {digest[:12]})" if digest else name


def check_datasets(names: Sequence[str]) -> None:
    """Raise ``ValueError`` for an unknown data set name or an empty ``.txt`` file."""
    if isinstance(names, str) or not names:
        raise ValueError("`datasets` must be a non-empty list of names, e.g. ['prose', 'code'].")
    for name in names:
        _dataset_documents(name)


def evaluation_texts(name: str, tokenizer, *, max_tokens: int) -> list[str]:
    """Documents of an evaluation data set, cut to about its first ``max_tokens`` tokens.

    Whole documents are kept while they fit; the last one is cut to the remaining token budget
    (decoded from its first tokens).

    Raises
    ------
    ValueError
        Unknown ``name``, an empty ``.txt`` file, or non-positive ``max_tokens``.
    """
    max_tokens = check_int("max_tokens", max_tokens, 1)
    docs, _ = _dataset_documents(name)
    out = _first_tokens(docs, tokenizer, max_tokens)
    if not out:
        raise ValueError(f"data set {name!r} holds no text.")
    return out


def _first_tokens(docs, tokenizer, max_tokens: int) -> list[str]:
    """Whole documents while they fit in ``max_tokens`` (one EOS between them), the last one cut."""
    out, used = [], 0
    for doc in docs:
        if not doc.strip():
            continue
        ids = encode(tokenizer, doc)
        room = max_tokens - used
        if len(ids) + 1 <= room:
            out.append(doc)
            used += len(ids) + 1  # one EOS between documents
        else:
            if room > 1:
                out.append(tokenizer.decode(ids[: room - 1]))
            break
    return out


#: Fewest tokens :func:`calibration_texts` takes: two per half, one scored token each.
MIN_CALIBRATION_TEXT_TOKENS = 4


def calibration_texts(tokenizer, *, max_tokens: int) -> list[str]:
    """Documents of the embedded calibration slice, about ``max_tokens`` tokens: half prose, half code.

    The text :func:`calibration_token_ids` tokenises, as documents (for perplexity on calibration
    text, e.g. when fitting a static per-layer allocation).
    """
    max_tokens = check_int("max_tokens", max_tokens, MIN_CALIBRATION_TEXT_TOKENS)
    out: list[str] = []
    for domain, budget in (("prose", max_tokens // 2), ("code", max_tokens - max_tokens // 2)):
        out += _first_tokens([r["text"] for r in load_corpus_slice("calibration", domain=domain)], tokenizer, budget)
    return out


def _balanced(records: list[dict], n: int | None) -> list[str]:
    """Alternate prose and code records (file order within a domain); the first ``n``."""
    by_domain: dict[str, list[str]] = {}
    for r in records:
        by_domain.setdefault(r["domain"], []).append(r["text"])
    out: list[str] = []
    columns = list(by_domain.values())
    for i in range(max((len(c) for c in columns), default=0)):
        out.extend(c[i] for c in columns if i < len(c))
    return out if n is None else out[:n]


def corpus_texts(slice_name: str, n: int | None = None, *, domain: str | None = None) -> list[str]:
    """Whole documents of the embedded corpus: ``"calibration"`` or ``"evaluation"`` slice, prose and
    code alternating (file order within a domain), the first ``n`` (all when None)."""
    return _balanced(load_corpus_slice(slice_name, domain=domain), n)
