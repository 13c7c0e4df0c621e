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


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned on ``words`` (each counted once; Sennrich et al. 2016's algorithm: merge the commonest
    adjacent pair, ties broken by the pair's text, until every word is one symbol). Applied in this order, CLIP's
    BPE turns each of ``words`` into a single token."""
    segmented = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in segmented):
        counts: dict[tuple[str, str], int] = {}
        for w in segmented:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, w in enumerate(segmented):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            segmented[k] = out
    return merges


def write_clip_tokenizer(directory: str | Path, words: list[str] | None = None) -> Path:
    """Write vocab.json and merges.txt that ``CLIPTokenizer.from_pretrained(directory)`` loads; with ``words``, the
    merges make each of them one token (``word_merges``) instead of the few built-in ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = word_merges(words) if words else MERGES
    symbols = list(byte_unicode_table().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
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
