"""Build the deterministic training corpus of the embedded tiny OLMoE from Debian packages.

Sources (all read from the local file system, no network):

* prose: Debian ``fortunes`` / ``fortunes-min`` (``/usr/share/games/fortunes``, plain text files,
  one document per fortune, split on ``%`` lines) and the Python 3.11 documentation sources
  (``python3.11-doc``: ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, one document per file);
* code: the Python standard library as shipped by Debian's ``libpython3.11-stdlib`` and
  ``libpython3.11-minimal`` (the ``.py`` files those two packages own, as listed by ``dpkg -L``,
  without test directories), one document per file.

Every document is assigned to train / valid / test (about 90 / 5 / 5) by a stable SHA-256 hash of
its source key, so the split never depends on file order, locale or Python's hash seed. Output:

* ``corpus_build/{train,valid,test}_{prose,code}.jsonl`` and ``corpus_build/manifest.json``
  (git-ignored, the training data);
* ``bh_helpers/data/corpus/{calibration,evaluation}.jsonl`` (committed slices: calibration from
  the valid split, evaluation from the test split, never from train), ``manifest.json`` and
  ``LICENSES.md``.

Running it twice gives byte-identical files (no timestamps, sorted inputs, ``sort_keys`` JSON).

Usage::

    python scripts/build_corpus.py [--out corpus_build]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_CORPUS_DIR = REPO / "bh_helpers" / "data" / "corpus"

FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB_DIR = Path("/usr/lib/python3.11")

# Debian package that provides each source (named in the error when a source is missing).
PACKAGES = {
    "fortunes": ["fortunes", "fortunes-min"],
    "python-docs": ["python3.11-doc"],
    "stdlib": ["libpython3.11-stdlib", "libpython3.11-minimal"],
}
SPLITS = ("train", "valid", "test")
DOMAINS = ("prose", "code")
# Path components dropped from the standard library: test suites are not "library code"
# and would dominate the code domain with repetitive assertions.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
# Budget of the committed slices, in characters of text per (slice, domain); keeps the
# four slices together at a few hundred KB.
SLICE_CHARS = 60_000
# Longest record in a committed slice: long files are cut at a line boundary so a slice
# holds many documents instead of a handful of big modules.
SLICE_MAX_RECORD = 3_000
MIN_FORTUNE_CHARS = 20


def fail(message: str) -> None:
    """Exit with a clear message (scripts may print)."""
    sys.exit(f"build_corpus: error: {message}")


def stable_bucket(key: str) -> int:
    """Bucket in [0, 100) from SHA-256 of ``key``: stable across runs, machines and Pythons."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(key: str) -> str:
    """About 90/5/5 train/valid/test by stable hash."""
    bucket = stable_bucket(key)
    return "train" if bucket < 90 else ("valid" if bucket < 95 else "test")


def package_versions(packages: list[str]) -> dict[str, str]:
    """Exact installed Debian versions (``dpkg-query``); fails naming the missing package."""
    versions = {}
    for pkg in packages:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
        if res.returncode != 0 or not res.stdout.strip():
            fail(f"Debian package `{pkg}` is not installed; install it with `apt-get install {pkg}`.")
        versions[pkg] = res.stdout.strip()
    return versions


def read_text(path: Path) -> str:
    # Normalise newlines; undecodable bytes (a few old fortunes) become U+FFFD, deterministically.
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def fortune_documents() -> list[dict]:
    if not FORTUNES_DIR.is_dir():
        fail(f"{FORTUNES_DIR} is missing; install the Debian package `fortunes` (apt-get install fortunes).")
    files = sorted(
        p for p in FORTUNES_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in {".dat", ".u8"}
    )
    if len(files) < 10:
        fail(f"only {len(files)} fortune files in {FORTUNES_DIR}; install the Debian package `fortunes`.")
    docs = []
    for path in files:
        chunks, current = [], []
        for line in read_text(path).split("\n"):
            if line.strip() == "%":
                chunks.append("\n".join(current))
                current = []
            else:
                current.append(line)
        chunks.append("\n".join(current))
        index = 0
        for chunk in chunks:
            text = chunk.strip("\n")
            if len(text.strip()) < MIN_FORTUNE_CHARS:
                continue
            docs.append({"domain": "prose", "source": f"fortunes/{path.name}#{index}", "text": text})
            index += 1
    return docs


def pydoc_documents() -> list[dict]:
    files = sorted(PYDOC_DIR.rglob("*.rst.txt")) if PYDOC_DIR.is_dir() else []
    if len(files) < 100:
        fail(f"Python docs sources not found under {PYDOC_DIR}; install the Debian package `python3.11-doc`.")
    return [
        {"domain": "prose", "source": f"python-docs/{p.relative_to(PYDOC_DIR).as_posix()}", "text": read_text(p)}
        for p in files
    ]


def stdlib_documents() -> list[dict]:
    owned: set[str] = set()
    for pkg in PACKAGES["stdlib"]:
        res = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            fail(f"Debian package `{pkg}` is not installed; install it with `apt-get install {pkg}`.")
        owned.update(res.stdout.split("\n"))
    files = []
    for name in sorted(owned):
        path = Path(name)
        if path.suffix != ".py" or STDLIB_DIR not in path.parents or not path.is_file():
            continue
        rel = path.relative_to(STDLIB_DIR)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(path)
    if len(files) < 100:
        fail(f"Python standard library not found under {STDLIB_DIR}; install `libpython3.11-stdlib`.")
    return [
        {"domain": "code", "source": f"stdlib/{p.relative_to(STDLIB_DIR).as_posix()}", "text": read_text(p)}
        for p in files
    ]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate_lines(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters at a line boundary."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit]


def take_slice(docs: list[dict], budget: int) -> list[dict]:
    """Deterministic pseudo-random pick (ordered by hash of the source) up to ``budget`` chars.

    For prose the fortunes and the docs alternate, so both kinds of prose are represented.
    """
    groups: dict[str, list[dict]] = {}
    for doc in docs:
        groups.setdefault(doc["source"].split("/", 1)[0], []).append(doc)
    for group in groups.values():
        group.sort(key=lambda d: hashlib.sha256(d["source"].encode()).hexdigest())
    order = []
    iters = [iter(groups[k]) for k in sorted(groups)]
    while iters:
        for it in list(iters):
            doc = next(it, None)
            if doc is None:
                iters.remove(it)
            else:
                order.append(doc)
    picked, used = [], 0
    for doc in order:
        text = truncate_lines(doc["text"], SLICE_MAX_RECORD).strip("\n")
        if len(text.strip()) < MIN_FORTUNE_CHARS:
            continue
        picked.append({"domain": doc["domain"], "source": doc["source"], "text": text})
        used += len(text)
        if used >= budget:
            break
    return picked


LICENSES_MD = """# Licences of the embedded corpus slices

The files in this folder (`calibration.jsonl`, `evaluation.jsonl`) are short excerpts of Debian
packages, taken from the held-out (valid / test) splits of the corpus that trained the embedded
tiny OLMoE (`bh_helpers/data/tiny_olmoe/`). Built by `scripts/build_corpus.py`; exact package
versions are in `manifest.json`. The `source` field of each record names the file it comes from.

## Prose: `fortunes/...` (Debian packages `fortunes`, `fortunes-min`, {fortunes_version})

From `/usr/share/doc/fortunes/copyright`: fortune-mod (original author Ken Arnold; Linux port by
Florian LaRoche; fortune files modified by Amy A. Lewis; the "cookie" file from Karl Lehenbauer's
postings to alt.sources) "falls under the BSD copyright": Copyright (c) 1991 The Regents of the
University of California, all rights reserved; redistribution and use in source and binary forms,
with or without modification, are permitted provided that the copyright notice, the list of
conditions and the disclaimer are retained (BSD licence, advertising clause deleted). The full text
is in that file of the Debian package.

## Prose: `python-docs/...` (Debian package `python3.11-doc`, {pydoc_version})

The Python 3.11 documentation sources, Copyright (c) 2001 and later, Python Software Foundation;
All Rights Reserved. Licensed under the Python Software Foundation License Version 2 (PSF-2.0), as
stated in `/usr/share/doc/python3.11-doc/copyright` ("Python License").

## Code: `stdlib/...` (Debian packages `libpython3.11-stdlib`, `libpython3.11-minimal`, {stdlib_version})

The Python 3.11 standard library sources, Copyright (c) 2001 and later, Python Software
Foundation; All Rights Reserved. Licensed under the Python Software Foundation License Version 2 (PSF-2.0), as
stated in `/usr/share/doc/libpython3.11-stdlib/copyright`; a few modules carry additional
permissive notices in their own headers, which are kept verbatim where a record includes them.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "corpus_build", help="scratch output folder")
    args = parser.parse_args(argv)

    versions = package_versions([p for pkgs in PACKAGES.values() for p in pkgs])
    docs = fortune_documents() + pydoc_documents() + stdlib_documents()

    by_split: dict[tuple[str, str], list[dict]] = {(s, d): [] for s in SPLITS for d in DOMAINS}
    for doc in docs:
        key = doc["source"]
        by_split[(split_of(key), doc["domain"])].append(doc)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for (split, domain), records in sorted(by_split.items()):
        path = out / f"{split}_{domain}.jsonl"
        write_jsonl(path, records)
        files[path.name] = {
            "documents": len(records),
            "chars": sum(len(r["text"]) for r in records),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        print(f"{path.name:>20}: {len(records):6d} docs, {files[path.name]['chars'] / 1e6:7.2f} M chars")

    split_rule = (
        "split = train if int(sha256(source)[:8], 16) % 100 < 90, valid if < 95, else test; "
        "source = 'fortunes/<file>#<index>' | 'python-docs/<path>' | 'stdlib/<path>'"
    )
    manifest = {
        "debian_packages": versions,
        "sources": {
            "fortunes": str(FORTUNES_DIR) + " (plain files, split on '%' lines)",
            "python-docs": str(PYDOC_DIR) + "/**/*.rst.txt",
            "stdlib": str(STDLIB_DIR) + "/**/*.py owned by libpython3.11-{stdlib,minimal} "
            f"(dpkg -L), excluding directories {sorted(EXCLUDED_DIRS)}",
        },
        "split_rule": split_rule,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    # Committed slices: calibration <- valid, evaluation <- test (never train).
    PACKAGE_CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    slice_info = {}
    for name, split in (("calibration", "valid"), ("evaluation", "test")):
        records = []
        for domain in DOMAINS:
            records += take_slice(by_split[(split, domain)], SLICE_CHARS)
        path = PACKAGE_CORPUS_DIR / f"{name}.jsonl"
        write_jsonl(path, records)
        slice_info[path.name] = {
            "from_split": split,
            "records": {d: sum(r["domain"] == d for r in records) for d in DOMAINS},
            "chars": {d: sum(len(r["text"]) for r in records if r["domain"] == d) for d in DOMAINS},
            "sha256": sha256_file(path),
        }
        print(f"{path.relative_to(REPO)}: {len(records)} records, {path.stat().st_size / 1e3:.0f} KB")
    package_manifest = {
        "debian_packages": versions,
        "sources": manifest["sources"],
        "split_rule": split_rule,
        "slices": slice_info,
        "max_record_chars": SLICE_MAX_RECORD,
        "built_by": "scripts/build_corpus.py",
    }
    (PACKAGE_CORPUS_DIR / "manifest.json").write_text(json.dumps(package_manifest, indent=2, sort_keys=True) + "\n")
    (PACKAGE_CORPUS_DIR / "LICENSES.md").write_text(
        LICENSES_MD.format(
            fortunes_version=versions["fortunes"],
            pydoc_version=versions["python3.11-doc"],
            stdlib_version=versions["libpython3.11-stdlib"],
        )
    )
    print(f"wrote {out}/manifest.json and {PACKAGE_CORPUS_DIR.relative_to(REPO)}/")


if __name__ == "__main__":
    main()
