"""Captions: cleaning (ftfy, HTML entities, whitespace) and tokenization with open_clip's CLIP BPE.

Token layout per caption: SOT, BPE ids, EOT, zero padding, CONTEXT_LENGTH ids in all. A
caption longer than that is cut and EOT is kept at the last position (open_clip's rule),
so EOT pooling always finds it.
"""

import html
import re

import ftfy
import numpy as np

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408  # BPE ids, SOT = 49406 and EOT = 49407 included
SOT_ID, EOT_ID = 49406, 49407
MASK_ID = 49408  # one id past the BPE vocabulary, used by masked language modelling
TOKEN_DTYPE = np.dtype("<i4")  # how token ids are stored in shards: int32 little-endian

_WHITESPACE = re.compile(r"\s+")
_tokenizer = None


def clean_caption(text):
    """Repair mojibake, unescape HTML (twice, for doubly escaped text), collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def tokenize(captions):
    """(N, CONTEXT_LENGTH) int32 token ids for a list of captions."""
    global _tokenizer
    if _tokenizer is None:
        from open_clip.tokenizer import SimpleTokenizer  # the BPE vocabulary ships with open_clip

        _tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    return _tokenizer(list(captions)).numpy().astype(TOKEN_DTYPE)


def tokens_to_bytes(token_ids):
    return np.asarray(token_ids, dtype=TOKEN_DTYPE).tobytes()


def tokens_from_bytes(data):
    return np.frombuffer(data, dtype=TOKEN_DTYPE)
