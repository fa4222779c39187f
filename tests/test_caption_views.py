"""Text views: each operation of the caption chain, its frequencies over many seeds, and its determinism."""

from collections import Counter

import numpy as np
import pytest

from datapipe.load.caption_views import (
    augment_caption,
    delete_words,
    remove_stop_words,
    replace_synonyms,
    swap_words,
    view_tokens,
)
from datapipe.load.recipes import STRONG_TEXT, WEAK_TEXT, TextView, clip_rocket_views
from datapipe.load.wordnet import stop_words, wordnet

CAPTION = "dog runs across green field near old barn"  # distinct words, each with WordNet synonyms
SEEDS = range(2000)


def rng(seed):
    return np.random.default_rng(seed)


def test_stop_word_removal_keeps_the_other_words_in_order():
    assert remove_stop_words(["A", "dog", "on", "the", "grass,", "with", "a", "ball"]) == ["dog", "grass,", "ball"]
    assert remove_stop_words(["the", "of"]) == ["the", "of"]  # nothing would be left: the caption stays
    assert {"the", "a", "of", "with"} <= stop_words() and "dog" not in stop_words()


def test_wordnet_synonyms_use_base_forms_and_leave_the_word_out():
    assert "domestic dog" in wordnet().synonyms("dogs") and "dog" not in wordnet().synonyms("dog")
    assert "goose" in wordnet().synonyms("geese")  # an exception-list form
    assert wordnet().synonyms("qwzx") == []


def test_synonym_replacement_replaces_one_word_everywhere_with_a_synonym():
    words = ["red", "dog", "and", "red", "ball"]
    for seed in range(50):
        out = replace_synonyms(words, 1, rng(seed))
        changed = {before for before, after in zip(words, out, strict=True) if before != after}
        assert len(changed) == 1, out
        (word,) = changed
        replacements = {after for before, after in zip(words, out, strict=True) if before == word}
        assert len(replacements) == 1 and replacements <= set(wordnet().synonyms(word))
        assert "and" not in changed  # stop words are never replaced


def test_random_swap_exchanges_two_positions():
    words = CAPTION.split()
    for seed in range(50):
        out = swap_words(words, 1, rng(seed))
        moved = [index for index, (before, after) in enumerate(zip(words, out, strict=True)) if before != after]
        assert sorted(out) == sorted(words) and len(moved) == 2
    assert swap_words(["alone"], 1, rng(0)) == ["alone"]


def test_random_deletion_keeps_an_ordered_subset_and_at_least_one_word():
    words = CAPTION.split()
    kept = [delete_words(words, 0.1, rng(seed)) for seed in SEEDS]
    for out in kept[:50]:
        iterator = iter(words)
        assert out and all(word in iterator for word in out)  # a subsequence
    assert abs(1 - np.mean([len(out) for out in kept]) / len(words) - 0.1) < 0.01  # each word at p = 0.1
    assert all(len(delete_words(words, 1.0, rng(seed))) == 1 for seed in range(20))


def classify(caption, out):
    before, after = caption.split(), out.split()
    if after == before:
        return "unchanged"
    if len(after) < len(before):
        return "deletion"
    return "swap" if sorted(after) == sorted(before) else "synonym"


def test_strong_captions_get_exactly_one_eda_operation_at_the_recipe_rates():
    view = TextView(eda_weights=STRONG_TEXT.eda_weights)  # stop words kept, so each operation shows alone
    counts = Counter(classify(CAPTION, augment_caption(CAPTION, view, rng(seed))) for seed in SEEDS)
    share = {kind: count / len(SEEDS) for kind, count in counts.items()}
    deleted_none = 0.9 ** len(CAPTION.split())  # a deletion that drew no word looks unchanged
    assert abs(share["swap"] - 0.4) < 0.04 and abs(share["synonym"] - 0.4) < 0.04
    assert abs(share["deletion"] - 0.2 * (1 - deleted_none)) < 0.03
    assert abs(share["unchanged"] - 0.2 * deleted_none) < 0.03


def test_weak_captions_lose_their_stop_words_at_the_recipe_rate():
    caption = "a dog on the grass"
    outs = [augment_caption(caption, WEAK_TEXT, rng(seed)) for seed in SEEDS]
    assert set(outs) == {caption, "dog grass"}
    assert abs(outs.count("dog grass") / len(outs) - 0.8) < 0.03


def test_text_view_tokens_are_a_function_of_the_sample_seed():
    recipe = clip_rocket_views()
    captions, seeds = ["a small red circle", "two blue squares on grass"], [11, 12]
    shard_tokens = np.zeros((2, 77), dtype=np.int64)
    first = view_tokens(recipe, shard_tokens, captions, seeds)
    assert first["weak_text"].shape == (1, 2, 77) and first["strong_text"].shape == (2, 2, 77)
    alone = view_tokens(recipe, shard_tokens[1:], captions[1:], seeds[1:])  # another batch holding sample 2
    for name in first:
        np.testing.assert_array_equal(first[name][:, 1], alone[name][:, 0])
    other = view_tokens(recipe, shard_tokens, captions, [21, 22])
    assert any(not np.array_equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("bad", [(0, 0, 0, 0), (1, 1, 1), (1, -1, 0, 0)])
def test_impossible_eda_weights_are_refused(bad):
    with pytest.raises(ValueError, match="eda_weights"):
        TextView(eda_weights=bad)
