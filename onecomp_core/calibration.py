"""Calibration samples: token id sequences of one length, from text files, jsonl, parquet or a
``datasets`` dataset; strategies concat_chunk, drop_head, drop_rand; seeded; cached on disk."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from .errors import OnecompError
from .hashing import files_digest, tokenizer_digest
from .model_source import cache_root, looks_local, offline
from .store import atomic_json, atomic_torch_save

STRATEGIES = ("concat_chunk", "drop_head", "drop_rand")
DEFAULT_TEXT = Path(__file__).parent / "data" / "enwiki_excerpt.txt"


def _text(p: Path) -> str:
    """A text file's content; a file that is not text (NUL bytes, or more than 1% of it not
    UTF-8) is refused rather than tokenized as garbage."""
    data = p.read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise OnecompError(f"calibration file {p} is not text (it has NUL bytes); give a .txt file of text")
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > 0.01 * max(len(text), 1):
        raise OnecompError(f"calibration file {p} is not UTF-8 text; convert it to UTF-8")
    return text


def read_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Documents of a calibration source. A .txt file is split at blank lines."""
    p = Path(source).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".txt", ".md", ".text", ""):
            text = _text(p)
            docs = [d.strip() for d in text.split("\n\n")]
        elif suffix in (".jsonl", ".json"):
            docs = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise OnecompError(f"{p}:{i + 1} is not a JSON line") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    raise OnecompError(f"{p}:{i + 1} has no {text_field!r} field; set calibration.text_field")
                docs.append(str(rec[text_field]))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(p)
            if text_field not in table.column_names:
                raise OnecompError(f"{p} has no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                                   f"set calibration.text_field")
            docs = [str(x) for x in table.column(text_field).to_pylist()]
        else:
            raise OnecompError(f"calibration file {p} has an unknown type; use .txt, .jsonl or .parquet")
    elif p.is_dir():
        docs = _from_datasets_disk(p, text_field, split)
    elif "/" in source and not looks_local(source):
        if offline():
            raise OnecompError(f"calibration source {source!r} is not a local path, and offline mode (--offline or "
                               f"HF_HUB_OFFLINE=1) forbids fetching it from the hub; give a local file")
        docs = _from_hub(source, text_field, split)
    else:
        raise OnecompError(f"calibration source {source!r} does not exist; give a .txt/.jsonl/.parquet file, "
                           f"a dataset folder, or a hub dataset id")
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise OnecompError(f"calibration source {source!r} is empty; give a file with text in it")
    return docs


def _column(ds, text_field, where):
    if text_field not in ds.column_names:
        raise OnecompError(f"{where} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                           f"set calibration.text_field")
    return [str(x) for x in ds[text_field]]


def _from_datasets_disk(p: Path, text_field: str, split: str) -> list[str]:
    import datasets
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:
        raise OnecompError(f"{p} is not a saved `datasets` dataset: {str(exc).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise OnecompError(f"{p} has no split {split!r} (splits: {', '.join(ds)}); set calibration.split")
        ds = ds[split]
    return _column(ds, text_field, str(p))


def _from_hub(name: str, text_field: str, split: str) -> list[str]:
    import datasets
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise OnecompError(f"cannot load hub dataset {name!r} ({str(exc).splitlines()[0]}); offline? "
                           f"use a local file") from None
    return _column(ds, text_field, name)


def select(docs_tokens: list[list[int]], n: int, seq_len: int, strategy: str, seed: int,
           spread: int = 0) -> torch.Tensor:
    """(n + spread, seq_len) token ids from tokenized documents.

    concat_chunk: concatenate everything, cut consecutive seq_len chunks, keep the first n; then
                  ``spread`` more spaced evenly over the chunks after them (held-out samples
                  from across the text, not only from where the first n end).
    drop_head:    documents of at least seq_len tokens, their first seq_len tokens, n drawn at random.
    drop_rand:    documents of at least seq_len tokens, a random seq_len window of each, n drawn.
    (For these two, ``spread`` more are drawn the same way.)
    """
    rng = random.Random(seed)
    if strategy == "concat_chunk":
        flat = [t for d in docs_tokens for t in d]
        have = _available([len(flat)], seq_len, strategy)
        if have == 0:
            raise OnecompError(f"calibration text has {len(flat)} tokens, shorter than one sample of "
                               f"{seq_len}; give more text or lower calibration.seq_len")
        if have < n + spread:
            raise OnecompError(f"calibration text gives {have} samples of {seq_len} tokens, {n + spread} asked"
                               f"{f' ({spread} held out)' if spread else ''}; give more text or lower "
                               f"calibration.num_samples")
        chunks = torch.tensor(flat[: have * seq_len]).view(have, seq_len)
        rest = have - n             # chunk n + floor((k + 1/2) * rest / spread): the middle of k's share
        return torch.cat([chunks[:n], chunks[[n + (2 * k + 1) * rest // (2 * spread) for k in range(spread)]]])
    if strategy not in STRATEGIES:
        raise OnecompError(f"unknown calibration strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    long = [d for d in docs_tokens if len(d) >= seq_len]           # _available's count for these strategies
    if len(long) < n + spread:
        raise OnecompError(f"strategy {strategy} needs {n + spread} documents of at least {seq_len} tokens, the "
                           f"calibration text has {len(long)}; use concat_chunk or lower seq_len/num_samples")
    picked = rng.sample(range(len(long)), n)
    rows = [_window(long[i], seq_len, strategy, rng) for i in picked]
    if spread:                              # from the documents not picked, by a second generator
        held = random.Random(f"{seed}:heldout")
        taken = set(picked)
        rows += [_window(long[i], seq_len, strategy, held)
                 for i in held.sample([i for i in range(len(long)) if i not in taken], spread)]
    return torch.tensor(rows, dtype=torch.long).view(len(rows), seq_len)


def _window(doc: list[int], seq_len: int, strategy: str, rng: random.Random) -> list[int]:
    start = 0 if strategy == "drop_head" else rng.randrange(0, len(doc) - seq_len + 1)
    return doc[start:start + seq_len]


def bos_id(tokenizer, mode: str = "auto") -> int | None:
    """The BOS token to start every sequence with: ``auto``, where the tokenizer puts one in
    front of a text (as transformers, lm-eval and llama.cpp feed the model); ``yes``, the
    tokenizer's BOS whenever it has one; ``no``, none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "no" or bos is None:
        return None
    if mode == "yes":
        return int(bos)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def calibration_samples(source: str | None, tokenizer, num_samples: int, seq_len: int,
                        strategy: str = "concat_chunk", seed: int = 0, text_field: str = "text",
                        split: str = "train", use_cache: bool = True, bos: int | None = None,
                        heldout: int = 0) -> torch.Tensor:
    """(num_samples + heldout, seq_len) token ids; with ``bos``, each sample is that token then
    seq_len - 1 tokens of text. The last ``heldout`` are spread over the rest of the source
    (:func:`select`); the first num_samples do not depend on it."""
    src = str(source) if source else str(DEFAULT_TEXT)
    key = _cache_key(src, tokenizer, num_samples, seq_len, strategy, seed, text_field, split, bos,
                     *((heldout,) if heldout else ()))
    cache = cache_root() / "calibration" / f"{key}.pt"
    if use_cache and cache.is_file():
        return torch.load(cache, weights_only=True)
    tokens = _tokenized(src, tokenizer, strategy, text_field, split)
    if bos is None:
        ids = select(tokens, num_samples, seq_len, strategy, seed, heldout)
    else:
        if seq_len < 2:
            raise OnecompError(f"calibration.seq_len {seq_len} leaves no text after the BOS token; use 2 or more")
        text = select(tokens, num_samples, seq_len - 1, strategy, seed, heldout)
        ids = torch.cat([torch.full((text.shape[0], 1), bos, dtype=text.dtype), text], 1)
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(cache, ids)
    return ids


def _tokenized(src: str, tokenizer, strategy: str, text_field: str, split: str) -> list[list[int]]:
    """The source's documents as token ids (for ``concat_chunk`` one document: the running text,
    as perplexity sees it)."""
    docs = read_documents(src, text_field, split)
    if strategy == "concat_chunk":
        docs = ["\n\n".join(docs)]
    return [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]


def _available(lengths: list[int], seq_len: int, strategy: str) -> int:
    """Samples of ``seq_len`` tokens that documents of these lengths give under ``strategy``
    (:func:`select`'s rule: concat_chunk cuts the running text, the others take one window of
    each document at least that long)."""
    if strategy == "concat_chunk":
        return sum(lengths) // max(seq_len, 1)
    return sum(n >= seq_len for n in lengths)


def available_samples(source: str | None, tokenizer, seq_len: int, strategy: str = "concat_chunk",
                      text_field: str = "text", split: str = "train", bos: int | None = None,
                      use_cache: bool = True) -> int:
    """How many samples of ``seq_len`` tokens the source gives under ``strategy`` (what
    :func:`calibration_samples` can draw, held-out ones included); cached beside the samples."""
    src = str(source) if source else str(DEFAULT_TEXT)
    cache = cache_root() / "calibration" / f"{_cache_key(src, tokenizer, 'available', seq_len, strategy, text_field, split, bos)}.json"
    if use_cache and cache.is_file():
        return int(json.loads(cache.read_text()))
    lengths = [len(t) for t in _tokenized(src, tokenizer, strategy, text_field, split)]
    have = _available(lengths, seq_len - (bos is not None), strategy)
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(cache, have)
    return have


def _cache_key(src, tokenizer, *parts) -> str:
    """The calibration cache key: the source by content (a file's or a saved dataset folder's
    bytes; a hub dataset by name), the tokenizer by what it does, and the sampling settings."""
    h = hashlib.sha1()
    p = Path(src).expanduser()
    h.update((files_digest([p]) if p.exists() else f"hub:{src}").encode())
    h.update(f"{tokenizer_digest(tokenizer)}:{parts}".encode())
    return h.hexdigest()[:16]
