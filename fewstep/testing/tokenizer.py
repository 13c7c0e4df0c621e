"""A hand-made byte-level CLIP BPE vocabulary (no hub download needed)."""
from __future__ import annotations

import json
from pathlib import Path

# A few merges so that common words become single tokens, as in a real BPE.
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n"), ("in", "g</w>")]


def byte_unicode_table() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def write_clip_tokenizer(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt that ``CLIPTokenizer.from_pretrained(directory)`` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(byte_unicode_table().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    return directory


#: the tiny T5 vocabulary: T5's special tokens, SentencePiece's word-start mark and printable ASCII
T5_PIECES = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]


def t5_tokenizer(model_max_length: int = 32):
    """A T5 tokenizer built with the ``tokenizers`` library (no SentencePiece file, no hub): a Unigram model over
    T5_PIECES, SentencePiece's Metaspace pre-tokenizer, ``</s>`` appended. A Unigram model, because transformers'
    T5 tokenizer rebuilds one from tokenizer.json when it loads (a WordLevel model does not load back)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tk = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(T5_PIECES)], unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=model_max_length)
