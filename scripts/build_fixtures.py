"""Build the small evaluation fixtures under bh_helpers/data/fixtures/ from the embedded corpus.

Deterministic (fixed seed, file order): running it twice gives byte-identical files.

    python scripts/build_fixtures.py [--corpus bh_helpers/data/corpus/evaluation.jsonl]

Outputs, each in the format of the corresponding hub rows so that the ordinary loaders in
``bh_helpers.models.datasets`` read them (``path=``):

- ``wikitext_style.txt``: WikiText raw style, `` = Title = `` heading then the document text, for
  documents of both domains up to about 24 kB.
- ``lambada_style.jsonl``: ``{"text"}`` one-line passages from the prose domain whose last word
  (the target) ends a sentence in the source and appears earlier in the passage.
- ``hellaswag_style.jsonl``: hub-style rows (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``,
  ``label``): ``ctx_a`` is a prose sentence, ``ctx_b`` the first words of the next one, the true
  ending the rest of that next sentence and three distractor endings the rests of sentences
  from other documents; the label position is drawn with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "bh_helpers" / "data" / "corpus" / "evaluation.jsonl"
OUT = ROOT / "bh_helpers" / "data" / "fixtures"
SEED = 20240901

WIKI_BUDGET_CHARS = 24_000
LAMBADA_MAX = 150
LAMBADA_CONTEXT_WORDS = (15, 45)  # passage length in words (min, max)
HELLASWAG_MAX = 100
HELLASWAG_SENTENCE_WORDS = (4, 30)
NEAREST_LENGTHS = 10  # distractors are drawn among the endings closest in length to the true one
CTX_B_WORDS = 2

_TITLE = re.compile(r"^ = [^=].* = $")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _read(corpus: Path) -> list[dict]:
    with corpus.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _title(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", " ", source).strip()


def build_wikitext(rows: list[dict]) -> str:
    prose = [r for r in rows if r["domain"] == "prose"]
    code = [r for r in rows if r["domain"] == "code"]
    ordered = [r for pair in zip(prose, code) for r in pair] + prose[len(code):] + code[len(prose):]
    parts, size = [], 0
    for row in ordered:
        lines = row["text"].splitlines()
        if any(_TITLE.match(line) for line in lines):
            continue
        article = f" = {_title(row['source'])} = \n \n" + "\n".join(lines) + "\n \n"
        if size + len(article) > WIKI_BUDGET_CHARS:
            continue
        parts.append(article)
        size += len(article)
    return "".join(parts)


def _words(text: str) -> list[str]:
    return text.split()


def build_lambada(rows: list[dict]) -> list[dict]:
    out = []
    lo, hi = LAMBADA_CONTEXT_WORDS
    for row in rows:
        if row["domain"] != "prose":
            continue
        words = _words(row["text"])
        last_end = 0  # passages of one document do not overlap
        for i in range(lo, len(words)):
            raw = words[i]
            if not raw.endswith((".", "!", "?")):
                continue
            target = raw.rstrip(".!?")
            if not _WORD.match(target):
                continue
            start = max(last_end, i - hi)
            context = words[start:i]
            if len(context) < lo:
                continue
            earlier = {w.strip(".,;:!?\"'()").lower() for w in context}
            if target.lower() not in earlier:
                continue
            out.append({"text": " ".join(context + [target])})
            last_end = i + 1
            if len(out) >= LAMBADA_MAX:
                return out
    return out


def _sentences(text: str) -> list[str]:
    lo, hi = HELLASWAG_SENTENCE_WORDS
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if lo <= len(s.split()) <= hi]


def build_hellaswag(rows: list[dict]) -> list[dict]:
    rng = random.Random(SEED)
    docs = [(r["source"], _sentences(r["text"])) for r in rows if r["domain"] == "prose"]
    pairs = []  # (doc index, sentence, next sentence)
    for d, (_, sents) in enumerate(docs):
        for a, b in zip(sents, sents[1:]):
            head = " ".join(b.split()[:CTX_B_WORDS])
            # HellaSwag's loader capitalises ctx_b (lower-casing the rest): keep heads it restores.
            if len(b.split()) > CTX_B_WORDS + 2 and head[1:] == head[1:].lower():
                pairs.append((d, a, b))
    rng.shuffle(pairs)
    out = []
    for d, ctx_a, nxt in pairs[:HELLASWAG_MAX]:
        head, tail = nxt.split()[:CTX_B_WORDS], " ".join(nxt.split()[CTX_B_WORDS:])
        others = sorted(
            (abs(len(p[2]) - len(nxt)), i) for i, p in enumerate(pairs) if p[0] != d
        )[:NEAREST_LENGTHS]
        picked = rng.sample([i for _, i in others], 3)
        distractors = [" ".join(pairs[i][2].split()[CTX_B_WORDS:]) for i in picked]
        label = rng.randrange(4)
        endings = distractors[:label] + [tail] + distractors[label:]
        ctx_b = " ".join(head)
        ctx_b = ctx_b[:1].lower() + ctx_b[1:]  # the loader capitalises it back, as for HellaSwag
        out.append(
            {
                "ind": len(out),
                "activity_label": docs[d][0].split("/")[0],
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "endings": endings,
                "source_id": docs[d][0],
                "split": "val",
                "label": str(label),
            }
        )
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = _read(args.corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wikitext_style.txt").write_text(build_wikitext(rows), encoding="utf-8")
    _write_jsonl(args.out / "lambada_style.jsonl", build_lambada(rows))
    _write_jsonl(args.out / "hellaswag_style.jsonl", build_hellaswag(rows))


if __name__ == "__main__":
    main()
