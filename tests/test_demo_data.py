import json

import demo.dataset


def test_generation_is_deterministic(tmp_path):
    first = demo.dataset.generate(tmp_path / "a", num_train=20, heldout_per_class=1, seed=3)
    second = demo.dataset.generate(tmp_path / "b", num_train=20, heldout_per_class=1, seed=3)
    assert first == second
    for item in first:
        if (tmp_path / "a" / "www" / item.path).is_file():
            assert (tmp_path / "a/www" / item.path).read_bytes() == (tmp_path / "b/www" / item.path).read_bytes()


def test_unseen_pairs_are_only_in_the_heldout_split(tmp_path):
    items = demo.dataset.generate(tmp_path, num_train=300, heldout_per_class=1)
    classes = json.loads((tmp_path / "heldout" / "classes.json").read_text())
    assert len(classes["classes"]) == len(demo.dataset.COLORS) * len(demo.dataset.SHAPES)
    captions = " | ".join(item.caption for item in items if item.kind == "train")
    for color, shape in demo.dataset.UNSEEN_PAIRS:
        assert f"{color} {shape}" not in captions
        assert f"{shape} in {color}" not in captions
        assert any((tmp_path / "heldout" / f"{color}_{shape}").iterdir())


def test_every_bad_entry_kind_is_present(tmp_path):
    kinds = {item.kind for item in demo.dataset.generate(tmp_path, num_train=5, heldout_per_class=1)}
    assert {"dead_link", "server_error", "html_page", "truncated_jpeg", "cmyk_jpeg", "png_alpha", "gif",
            "one_pixel", "extreme_aspect", "empty_caption", "mojibake_caption", "duplicate_first",
            "duplicate_second", "grayscale_jpeg", "exif_rotated"} <= kinds


def test_ensure_generated_regenerates_when_settings_change(tmp_path):
    assert len(demo.dataset.ensure_generated(tmp_path, num_train=5, heldout_per_class=1)) == 5 + 15
    assert len(demo.dataset.ensure_generated(tmp_path, num_train=8, heldout_per_class=1)) == 8 + 15
