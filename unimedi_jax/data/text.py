"""Report tokenisation with the checkpoint's Hugging Face fast tokenizer.

Every report becomes exactly `max_length` tokens (padded to max_length, truncated beyond it):
`input_ids` and `attention_mask`, int32 (..., max_length), as docs/CONTRACTS.md fixes.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

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


@functools.lru_cache(maxsize=None)
def cached_tokenizer(folder: str):
    """`load_tokenizer(folder)`, loaded once per process (call it holding `_LOCK`)."""
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
    # Python lists, then one conversion: cheaper than return_tensors="np" for short inputs.
    with _LOCK:  # the call sets the tokenizer's padding length: one thread at a time
        encoded = tokenizer(
            [texts] if single else list(texts),
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_token_type_ids=False,
        )
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
