import numpy as np

from datapipe.common import captions


def test_clean_caption_repairs_mojibake_entities_and_whitespace():
    assert captions.clean_caption("a cafÃ© on the corner") == "a café on the corner"
    assert captions.clean_caption("fish &amp;amp; chips") == "fish & chips"
    assert captions.clean_caption("  two\t\nlines  ") == "two lines"
    assert captions.clean_caption(" \t ") == ""


def test_tokens_have_sot_eot_and_zero_padding():
    tokens = captions.tokenize(["a red circle"])
    assert tokens.shape == (1, captions.CONTEXT_LENGTH) and tokens.dtype == np.int32
    row = tokens[0]
    eot = int(np.argmax(row == captions.EOT_ID))
    assert row[0] == captions.SOT_ID and eot == 4 and not row[eot + 1:].any()


def test_long_caption_keeps_eot_in_the_last_position():
    row = captions.tokenize([" ".join(["word"] * 200)])[0]
    assert row[-1] == captions.EOT_ID and (row != 0).all()


def test_tokens_round_trip_through_bytes():
    tokens = captions.tokenize(["a blue ring"])[0]
    assert len(captions.tokens_to_bytes(tokens)) == 4 * captions.CONTEXT_LENGTH
    np.testing.assert_array_equal(captions.tokens_from_bytes(captions.tokens_to_bytes(tokens)), tokens)
