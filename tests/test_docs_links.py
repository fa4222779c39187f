"""Every reference resolves inside a clone: markdown links in README and docs, and the repository files that code,
presets and docs cite by path. Nothing points outside the repository (our working notes are not part of it)."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
TRACKED = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
TEXT_FILES = [name for name in TRACKED if name.endswith((".md", ".py", ".yaml", ".toml", ".txt"))
              or name in ("Makefile", ".ci/run")]
MARKDOWN = [name for name in TEXT_FILES if name.endswith(".md")]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PACKAGES = "datapipe|model|train|evaluation|comparison|export|demo|tools|tests|docs|examples|shards"
CITED_PATH = re.compile(rf"(?<![\w/.<-])((?:{PACKAGES})/[\w./-]*\.(?:py|md|yaml|json|png|txt|toml))(?![\w/<])")
# The notes the project was specified from live outside the repository: a clone has none of them.
OUTSIDE = re.compile(r"\.\./shared\b|\b(?:" + "|".join(("METH" + "ODS", "HARM" + "ONY", "DES" + "IGN", "ST" + "YLE"))
                     + r")\.md\b")


def text(name):
    return (REPO / name).read_text(errors="replace")


@pytest.mark.parametrize("name", MARKDOWN)
def test_markdown_links_resolve(name):
    broken = []
    for target in LINK.findall(text(name)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (REPO / name).parent / target.split("#")[0]
        if not path.exists():
            broken.append(target)
    assert not broken, f"{name} links to files a clone does not have: {broken}"


def test_cited_files_exist():
    missing = {}
    # the worked example's files, which the guide has the reader create (tests/test_adding_a_method.py creates them)
    examples = set(re.findall(r"<!-- example file: (\S+) -->", text("docs/adding-a-method.md")))
    for name in TEXT_FILES:
        for cited in set(CITED_PATH.findall(text(name))) - examples:
            generated = cited.startswith(("shards/demo/", "shards/cc"))  # datasets are built, never committed
            if not generated and not (REPO / cited).exists():
                missing.setdefault(name, []).append(cited)
    assert not missing, f"files cited that a clone does not have (file: cited): {missing}"


def test_nothing_points_outside_the_repository():
    outside = {name: sorted(set(OUTSIDE.findall(text(name)))) for name in TEXT_FILES if OUTSIDE.search(text(name))}
    assert not outside, f"references to files outside the repository: {outside}"


def test_the_readme_is_a_front_door():
    """At most 20 KB: what it is, the commands, the common tasks, the layout and links; the rest lives in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 20_000
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    assert {path.name for path in (REPO / "docs").glob("*.md")} <= linked
