"""Train the byte-level BPE tokenizer of the embedded tiny OLMoE and tokenize the corpus splits.

Reads ``corpus_build/{split}_{domain}.jsonl`` (from ``scripts/build_corpus.py``), trains a
byte-level BPE (vocabulary 4096, special tokens ``<|endoftext|>`` = bos/eos and ``<|padding|>`` =
pad) on the TRAIN split only, saves it under ``bh_helpers/data/tiny_olmoe/`` as ``tokenizer.json``
+ ``tokenizer_config.json`` + ``special_tokens_map.json`` (loadable offline by
``transformers.AutoTokenizer.from_pretrained``), and writes
``corpus_build/tokens_{split}_{domain}.npy`` (uint16, documents joined with eos, every document
followed by one eos) for training.

Usage::

    python scripts/train_tokenizer.py [--corpus corpus_build] [--out bh_helpers/data/tiny_olmoe]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
DOMAINS = ("prose", "code")
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PAD = "<|padding|>"


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        sys.exit(f"train_tokenizer: error: {path} is missing; run `python scripts/build_corpus.py` first.")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(train_texts: list[str]):
    """Byte-level BPE with the `tokenizers` library (deterministic for a fixed input order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: code indentation and line starts keep their exact bytes.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    return tok


def save_for_transformers(tok, out: Path) -> None:
    """Wrap in PreTrainedTokenizerFast and save the three files AutoTokenizer reads."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    # transformers v5 keeps special tokens in tokenizer_config.json; older readers (and humans)
    # look for special_tokens_map.json, so write it explicitly.
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(special)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus_build")
    parser.add_argument("--out", type=Path, default=REPO / "bh_helpers" / "data" / "tiny_olmoe")
    args = parser.parse_args(argv)

    texts = {(s, d): read_texts(args.corpus / f"{s}_{d}.jsonl") for s in SPLITS for d in DOMAINS}
    train_texts = texts[("train", "prose")] + texts[("train", "code")]
    tok = train_tokenizer(train_texts)
    save_for_transformers(tok, args.out)
    eos_id = tok.token_to_id(EOS)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, eos id {eos_id}, pad id {tok.token_to_id(PAD)} -> {args.out}")

    stats = {}
    for (split, domain), docs in sorted(texts.items()):
        ids = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos_id)
        arr = np.asarray(ids, dtype=np.uint16)
        path = args.corpus / f"tokens_{split}_{domain}.npy"
        np.save(path, arr)
        chars = sum(len(t) for t in docs)
        stats[f"{split}_{domain}"] = {"tokens": int(arr.size), "chars": chars, "chars_per_token": chars / max(arr.size, 1)}
        print(f"{path.name:>26}: {arr.size / 1e6:7.3f} M tokens ({chars / max(arr.size, 1):.2f} chars/token)")
    (args.corpus / "tokens_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
