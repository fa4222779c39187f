"""Dependencies point one way. The data path's stages (fetch: url lists -> raw shards; shards: raw -> training
shards; load: training shards -> batches) import their shared helpers (datapipe/common) and never a later stage or
the package above them; the model knows nothing of files; the product packages never import the instruments
(tools/)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DATAPIPE_STAGES = ("common", "fetch", "shards", "load")
# each unit -> the units it may import ("datapipe": the package's public names or any of its stages)
MAY_IMPORT = {
    "datapipe.common": set(),
    "datapipe.fetch": {"datapipe.common"},
    "datapipe.shards": {"datapipe.common", "datapipe.fetch"},
    "datapipe.load": {"datapipe.common"},
    "model": set(),
    "train": {"model", "datapipe"},
    "evaluation": {"model", "train", "datapipe"},
    "comparison": {"evaluation", "model", "train", "datapipe"},
    "export": {"evaluation", "model", "train", "datapipe"},
    "demo": {"datapipe"},
}
UNITS = {"datapipe", "model", "train", "evaluation", "comparison", "export", "demo", "tools"}


def unit(module):
    """The layer a dotted module name belongs to, or None outside the project."""
    parts = module.split(".")
    if parts[0] not in UNITS:
        return None
    if parts[0] == "datapipe" and len(parts) > 1 and parts[1] in DATAPIPE_STAGES:
        return f"datapipe.{parts[1]}"
    return parts[0]


def imported_units(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        yield from filter(None, map(unit, modules))


def module_unit(path):
    return unit(".".join(path.relative_to(REPO).with_suffix("").parts))


PRODUCT = sorted(path for name in MAY_IMPORT for path in (REPO / name.replace(".", "/")).rglob("*.py"))


def test_every_product_folder_is_a_layer():
    assert {path.parts[0] for path in (p.relative_to(REPO) for p in REPO.glob("*/__init__.py"))} == UNITS | {
        "examples"}
    assert {path.parent.name for path in (REPO / "datapipe").glob("*/__init__.py")} == set(DATAPIPE_STAGES)
    assert [path.name for path in (REPO / "datapipe").glob("*.py")] == ["__init__.py"]


@pytest.mark.parametrize("path", PRODUCT, ids=lambda path: str(path.relative_to(REPO)))
def test_imports_point_one_way(path):
    own = module_unit(path)
    allowed = {own} | MAY_IMPORT[own]
    wrong = {name for name in imported_units(path) if name not in allowed
             and not (name.startswith("datapipe") and "datapipe" in allowed)}
    assert not wrong, f"{path.relative_to(REPO)} ({own}) imports {sorted(wrong)}; it may import {sorted(allowed)}"
