"""What llama.cpp reads besides the tensors: architecture keys, tensor names, the tokenizer."""
from __future__ import annotations

from pathlib import Path

from onecomp_core.sdk import OnecompError

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}   # model_type -> GGUF architecture
PERMUTED = {"llama"}       # GGUF architectures whose q/k rows llama.cpp wants in its interleaved rotary order


def tensor_name(cfg: dict):
    """-> name(hf_key) giving the GGUF tensor name (gguf-py's table for the architecture)."""
    import gguf
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHS[cfg["model_type"]])
    table = gguf.get_tensor_name_map(arch, int(cfg["num_hidden_layers"]))

    def name(key: str) -> str:
        got = table.get_name(key, try_suffixes=(".weight", ".bias"))
        if got is None:
            raise OnecompError(f"--export gguf has no GGUF name for tensor {key}; drop --export gguf")
        return got
    return name


def check_tokenizer(source_folder: Path) -> None:
    """A byte-level BPE tokenizer (tokenizer.json or vocab.json + merges.txt) is what this exporter
    writes; say so before any work otherwise."""
    from gguf.vocab import BpeVocab
    try:
        BpeVocab(Path(source_folder))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise OnecompError(f"--export gguf writes byte-level BPE tokenizers; none usable in {source_folder} "
                           f"({exc or type(exc).__name__}): drop --export gguf") from None


# the split patterns of Llama 3's and Qwen2's tokenizers (a Split pre-tokenizer before byte-level)
SPLIT_PATTERNS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def pre_tokenizer(source_folder: Path) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the way the source tokenizer splits text
    before BPE, read off tokenizer.json: byte-level with GPT-2's regex alone -> ``gpt-2``;
    single digits split off first -> ``smollm``; Llama 3's or Qwen2's split pattern before a
    byte-level step without regex -> ``llama-bpe`` / ``qwen2``. None: not one of these."""
    import json
    path = Path(source_folder) / "tokenizer.json"
    if not path.is_file():
        return "gpt-2"                            # vocab.json + merges.txt: GPT-2's byte-level BPE
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    byte_regex = [st for st in steps if st.get("type") == "ByteLevel" and st.get("use_regex", True)]
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_regex:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, p in SPLIT_PATTERNS.items() if p == pattern), None)
    return None


def add_metadata(writer, cfg: dict, source_folder: Path, pre: str) -> None:
    from gguf.vocab import BpeVocab, SpecialVocab
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    writer.add_name(str(cfg.get("_name_or_path") or "onecomp"))
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(head_dim)                # always: readers default it per architecture (Qwen3: 128)
    writer.add_value_length(head_dim)
    vocab = BpeVocab(Path(source_folder))
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    n_vocab = int(cfg.get("vocab_size", len(tokens)))
    while len(tokens) < n_vocab:                   # a padded embedding: name the padding rows
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(5)                            # USER_DEFINED, as llama.cpp's converter pads
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(Path(source_folder), load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)
