"""Text views: each sample's captions through CLIP 🚀's augmentation chain (docs/methods/clip_rocket.md), as samples
are read.

Per caption: stop words removed with the view's probability (unless nothing would be left), then exactly one
EDA operation (Wei and Zou 2019, as textaugment 1.3.4 does it on whitespace-split words): identity, synonym
replacement (n words, each replaced everywhere by a WordNet synonym), random swap (n pairs) or random
deletion (each word with p, one always kept). Every choice is drawn from a generator seeded by
(sample seed, TEXT_STREAM + caption number), never from a global RNG, so a resumed run and every backend
see the same captions.
"""

import numpy as np

from datapipe.common.captions import tokenize
from datapipe.load.wordnet import stop_words, wordnet

TEXT_STREAM = 1000  # caption k of a sample draws from (seed, TEXT_STREAM + k); crops use numbers below it
OPERATIONS = ("identity", "synonym", "swap", "deletion")


def is_stop_word(word):
    """Case and surrounding punctuation ignored: "The" and "on," are stop words."""
    return word.lower().strip(".,;:!?\"'()[]") in stop_words()


def remove_stop_words(words):
    kept = [word for word in words if not is_stop_word(word)]
    return kept or words


def replace_synonyms(words, count, rng):
    candidates = sorted({word for word in words if not is_stop_word(word)})
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        if replaced >= count:
            break
        synonyms = wordnet().synonyms(word)
        if synonyms:
            synonym = synonyms[rng.integers(len(synonyms))]
            words = [synonym if other == word else other for other in words]
            replaced += 1
    return words


def swap_words(words, count, rng):
    words = list(words)
    for _ in range(count):
        first = second = rng.integers(len(words))
        for _ in range(4):  # EDA gives up after 4 draws of the same index (one-word captions)
            second = rng.integers(len(words))
            if second != first:
                words[first], words[second] = words[second], words[first]
                break
    return words


def delete_words(words, probability, rng):
    if len(words) == 1:
        return words
    kept = [word for word in words if rng.random() > probability]
    return kept or [words[rng.integers(len(words))]]


def augment_caption(caption, view, rng):
    """One caption through `view`'s chain; `rng` a numpy Generator."""
    words = caption.split()
    if not words:
        return caption
    if rng.random() < view.stopword_prob:
        words = remove_stop_words(words)
    weights = np.asarray(view.eda_weights, dtype=np.float64)
    operation = OPERATIONS[rng.choice(len(OPERATIONS), p=weights / weights.sum())]
    if operation == "synonym":
        words = replace_synonyms(words, view.synonyms_replaced, rng)
    elif operation == "swap":
        words = swap_words(words, view.swaps, rng)
    elif operation == "deletion":
        words = delete_words(words, view.deletion_prob, rng)
    return " ".join(words)


def view_tokens(recipe, tokens, captions, sample_seeds):
    """text view name -> (n, B, 77) int64 tokens: the shard's `tokens` (B, 77) for views that do not augment,
    else the tokens of each sample's caption (`captions`, B strings) through the view's chain."""
    texts, number = {}, 0
    for name, view in recipe.text_views.items():
        if not view.augments:
            texts[name] = np.repeat(tokens[None], view.captions, axis=0)
        else:
            augmented = [[augment_caption(caption, view, np.random.default_rng([seed, TEXT_STREAM + number + copy]))
                          for caption, seed in zip(captions, sample_seeds, strict=True)]
                         for copy in range(view.captions)]
            texts[name] = np.stack([tokenize(batch) for batch in augmented]).astype(np.int64)  # (n, B, 77)
        number += view.captions
    return texts
