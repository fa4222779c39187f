"""docs/config.md: every setting of a training config (section.name, type, default, valid range, meaning), generated
from the config classes themselves, so it cannot drift from them (a test compares it with the file).

    python -m train.config_reference --out docs/config.md        # make docs

A setting's meaning is the comment on its line, else the comment block right above it, else its range note.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import math
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

from model.objectives import OBJECTIVES
from train.config import TrainConfig

DEFAULT_OUT = Path(__file__).parents[1] / "docs" / "config.md"
HEADER = """# Config reference

Every setting of a training config, generated from the config classes by `make docs` (`python -m
train.config_reference`); a test fails when this page and the code differ. A preset
(`train/configs/<method>/<scale>.yaml`, docs/training.md) sets some of them over these defaults (the towers' are
Harmony's ViT-B/16 on CC3M) and names the objectives the run trains under `model.objectives`, each with its own
settings (the sections `model.objectives.<name>` below); `TRAIN_ARGS` or `key=value` after `python -m train.pretrain`
overrides any of them, e.g. `TRAIN_ARGS="optim.epochs=3 model.objectives.mae=false model.objectives.clip.weight=2"`
(`=false` leaves an objective out, `={}` adds one with its defaults). A value outside its range, an unknown setting or
objective, or a value of the wrong type stops the run before it starts, with one line naming the setting.
"""


def field_comments(cls):
    """{field name: its meaning from the source comments of `cls` and the dataclasses it extends}: the comment on the
    field's line, else the block of comment lines right above it."""
    meanings = {}
    for base in reversed([base for base in cls.__mro__ if dataclasses.is_dataclass(base)]):
        meanings.update(_own_field_comments(base))
    return meanings


def _own_field_comments(cls):
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}  # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    meanings = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        line = node.lineno
        if line in comments and lines[line - 1].lstrip()[:1] != "#":
            meanings[node.target.id] = comments[line]
            continue
        above = []
        while line - 1 in comments and lines[line - 2].lstrip().startswith("#"):
            line -= 1
            above.insert(0, comments[line])
        if above:
            meanings[node.target.id] = " ".join(above)
    return meanings


def type_name(annotation):
    if isinstance(annotation, str):
        return annotation
    if typing.get_origin(annotation) is not None or "|" in repr(annotation):
        return repr(annotation).replace("typing.", "")
    return annotation.__name__


def default_text(setting):
    value = setting.default if setting.default is not dataclasses.MISSING else setting.default_factory()
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, float):
        return repr(round(value, 6)) if math.isfinite(value) else str(value)
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def section_rows(section, cls):
    meanings = field_comments(cls)
    rows = []
    for setting in dataclasses.fields(cls):
        ranges = setting.metadata.get("range", ())
        meaning = meanings.get(setting.name) or setting.metadata.get("note", "")
        rows.append((f"{section}.{setting.name}", type_name(setting.type), default_text(setting),
                     "; ".join(str(allowed) for allowed in ranges), meaning))
    return rows


def escaped(text):
    return text.replace("|", "\\|")


def first_paragraph(text):
    return (text or "").split("\n\n")[0].replace("\n", " ")


def objective_summary(objective):
    """What an objective is (its module's first paragraph, its class's), what it needs and what it excludes."""
    summary = [first_paragraph(sys.modules[objective.__module__].__doc__)]
    if objective.__doc__:
        summary.append(first_paragraph(objective.__doc__))
    if objective.requires:
        summary.append(f"Needs {', '.join(f'`{name}`' for name in objective.requires)}.")
    if objective.excludes:
        summary.append(f"Cannot run with {', '.join(f'`{name}`' for name in objective.excludes)}.")
    return " ".join(summary)


def sections():
    """[(section name, summary, settings class)]: the config's sections, then each objective's settings."""
    found = [(section.name, first_paragraph(inspect.getdoc(section.default_factory)), section.default_factory)
             for section in dataclasses.fields(TrainConfig)]
    return found + [(f"model.objectives.{name}", objective_summary(objective), objective.Settings)
                    for name, objective in OBJECTIVES.items()]


def reference():
    """The page's markdown text."""
    parts = [HEADER]
    for section, summary, cls in sections():
        parts.append(f"\n## {section}\n\n" + (f"{summary}\n\n" if summary else ""))
        parts.append("| setting | type | default | range | meaning |\n|---|---|---|---|---|\n")
        for name, kind, default, allowed, meaning in section_rows(section, cls):
            cells = [f"`{name}`", escaped(kind), f"`{escaped(default)}`", escaped(allowed), escaped(meaning)]
            parts.append(f"| {' | '.join(cells)} |\n")
    return "".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.write_text(reference())
    rows = sum(len(dataclasses.fields(cls)) for _, _, cls in sections())
    print(f"wrote {args.out}: {rows} settings")


if __name__ == "__main__":
    main()
