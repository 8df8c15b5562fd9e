"""Report tokenisation with the checkpoint's Hugging Face fast tokenizer.

Every report becomes exactly `max_length` tokens (padded to max_length, truncated beyond it):
`input_ids` and `attention_mask`, int32 (..., max_length), as docs/CONTRACTS.md fixes.

Two ways to hold the tokenizer, with the same ids: `load_tokenizer` gives the `transformers`
`PreTrainedTokenizerFast` (what the export saves, and the reference), `cached_tokenizer` (the
data pipeline and evaluation) the `tokenizers.Tokenizer` of the folder's tokenizer.json when it
has one: the same Rust tokenizer that `transformers` wraps, without importing `transformers`
(and through it torch, when installed), which takes seconds in every Grain worker.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np
import tokenizers

MAX_LENGTH = 112  # DESIGN.md section 3 (MGCA's report length)
# Either file is enough for the Hugging Face fast BERT tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


# Grain's reader threads share one tokenizer per process; a fast tokenizer must not be called
# from two threads at once (each call resets its truncation/padding state: "Already borrowed",
# huggingface/tokenizers#537, and the padding length set by one call can be used by another's),
# so loading and calling it (`tokenize`, which every caller goes through) hold this lock.
_LOCK = threading.Lock()


def load_tokenizer(folder: str | os.PathLike):
    """The Hugging Face fast tokenizer (`PreTrainedTokenizerFast`) stored in `folder`."""
    import transformers  # imported here: seconds to import, and only loading a tokenizer needs it

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"No tokenizer in {folder}: expected one of "
                                f"{list(TOKENIZER_FILES)}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
        raise TypeError(f"Tokenizer in {folder} is a {type(tokenizer).__name__}, not a fast "
                        "tokenizer")
    return tokenizer


def _pad_token(folder: Path) -> str:
    """The pad token the folder's tokenizer_config.json names ("[PAD]", BERT's, when none)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    pad = config.get("pad_token") or "[PAD]"
    return pad["content"] if isinstance(pad, dict) else str(pad)


def load_backend(folder: str | os.PathLike) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` of folder/tokenizer.json, with its pad token id and truncation
    and padding cleared (`tokenize` sets them per call, as `transformers` does)."""
    folder = Path(folder)
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad = _pad_token(folder)
    if backend.token_to_id(pad) is None:
        raise ValueError(f"{folder / 'tokenizer.json'} has no pad token {pad!r} (named by "
                         "tokenizer_config.json)")
    backend.no_truncation()
    backend.no_padding()
    backend.pad_token = pad  # a plain attribute: read by `tokenize`
    return backend


@functools.lru_cache(maxsize=None)
def cached_tokenizer(folder: str):
    """The folder's tokenizer, loaded once per process (call it holding `_LOCK`): the
    `tokenizers.Tokenizer` of its tokenizer.json (`load_backend`), else `load_tokenizer`'s."""
    if (Path(folder) / "tokenizer.json").is_file():
        return load_backend(folder)
    return load_tokenizer(folder)


def as_text(value: Any) -> str:
    """A stored text field (bytes from TFDS, str, or a 0-d numpy array of either) as str."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"Expected text (str or bytes), got {type(value).__name__}")


def tokenize(tokenizer, texts: str | Sequence[str],
             max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Text(s) -> {"input_ids", "attention_mask"} int32: (max_length,) for one str, else
    (B, max_length)."""
    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    # Python lists, then one conversion: cheaper than return_tensors="np" for short inputs.
    with _LOCK:  # the call sets the tokenizer's padding length: one thread at a time
        if isinstance(tokenizer, tokenizers.Tokenizer):  # as transformers sets its backend
            tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first",
                                        direction="right")
            tokenizer.enable_padding(direction="right", pad_id=tokenizer.token_to_id(
                tokenizer.pad_token), pad_type_id=0, pad_token=tokenizer.pad_token,
                length=max_length)
            encodings = tokenizer.encode_batch(batch)
            encoded = {"input_ids": [e.ids for e in encodings],
                       "attention_mask": [e.attention_mask for e in encodings]}
        else:
            encoded = tokenizer(batch, max_length=max_length, padding="max_length",
                                truncation=True, return_token_type_ids=False)
    out = {key: np.asarray(encoded[key], np.int32) for key in ("input_ids", "attention_mask")}
    return {key: value[0] for key, value in out.items()} if single else out


class Tokenize(grain.transforms.Map):
    """Replaces the `field` text of a record by `input_ids` and `attention_mask` (max_length,).

    Holds only the tokenizer folder, so it pickles to worker processes, each of which loads the
    tokenizer on its first element.
    """

    def __init__(self, folder: str, max_length: int = MAX_LENGTH, field: str = "report"):
        self.folder = str(folder)
        self.max_length = int(max_length)
        self.field = field

    def map(self, element: dict) -> dict:
        out = dict(element)
        text = as_text(out.pop(self.field))
        with _LOCK:
            tokenizer = cached_tokenizer(self.folder)
        out.update(tokenize(tokenizer, text, self.max_length))
        return out
