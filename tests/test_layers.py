"""Dependencies point one way: datapipe (the library) never imports the tools, the trainer or the model."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def imported_packages(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", sorted((REPO / "datapipe").rglob("*.py")),
                         ids=lambda path: str(path.relative_to(REPO / "datapipe")))
def test_datapipe_imports_no_layer_above_it(path):
    assert not {"tools", "train", "model"} & set(imported_packages(path))
