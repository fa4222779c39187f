"""The documentation's text, for the tests that run its commands as written: README.md and every page under docs/,
so a command may live on any page.

    lines = doc_lines()                  # README.md first, then docs/**/*.md in path order
    mixtures = documented_mixtures()     # the `make pretrain` mixing examples, as the trainer's overrides
"""

import shlex
from pathlib import Path

REPO = Path(__file__).parents[1]


def doc_pages():
    """README.md, then every Markdown page under docs/ in path order (a page's commands keep their order)."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def doc_lines():
    """Every line of every documentation page, page after page."""
    return [line for page in doc_pages() for line in page.read_text().splitlines()]


def documented_mixtures():
    """Each documented `make pretrain` line that mixes shard sets by weight, as the `data.shards=` and
    `data.mix_weights=` overrides make hands the trainer: from TRAIN_SHARDS and MIX_WEIGHTS, or from TRAIN_ARGS."""
    mixtures = []
    for line in doc_lines():
        if not line.strip().startswith("make pretrain") or "mix_weights" not in line.lower():
            continue
        variables = dict(word.split("=", 1) for word in shlex.split(line.strip())[2:] if "=" in word)
        if "TRAIN_SHARDS" in variables:
            overrides = [f"data.shards={variables['TRAIN_SHARDS']}", f"data.mix_weights={variables['MIX_WEIGHTS']}"]
        else:  # TRAIN_ARGS, split into words as tools/make_args.py splits it
            overrides = [word for word in shlex.split(variables["TRAIN_ARGS"])
                         if word.startswith(("data.shards=", "data.mix_weights="))]
        mixtures.append(overrides)
    return mixtures
