"""docs/mistakes.md and the tests name the same catalogue rows, and every row has a test."""
import re

import pytest

from tests.conftest import REPO

CATALOGUE = REPO.parent / "shared" / "MISTAKES.md"


def _doc_ids() -> set[str]:
    return set(re.findall(r"^\| (M\d\d) \|", (REPO / "docs" / "mistakes.md").read_text(), re.M))


def _test_ids() -> set[str]:
    names = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    prefixes = re.findall(r"def test_((?:m\d\d_)+)", names)  # test_m27_m28_... names two rows
    return {m.upper() for p in prefixes for m in re.findall(r"m\d\d", p)}


def test_every_row_in_the_docs_has_a_test_and_every_tested_row_is_documented():
    doc, tested = _doc_ids(), _test_ids()
    assert doc == {f"M{i:02d}" for i in range(1, len(doc) + 1)} and len(doc) >= 38  # M01..M38, then the project's
    assert doc - tested == set(), f"rows without a test: {sorted(doc - tested)}"
    assert tested - doc == set(), f"tests for rows the page lacks: {sorted(tested - doc)}"


def test_the_docs_follow_the_catalogue_when_it_is_present():
    if not CATALOGUE.exists():
        pytest.skip("no ../shared/MISTAKES.md beside this clone: the page itself is the reference")
    text = CATALOGUE.read_text()
    rows = set(re.findall(r"^\| (M\d\d) \|", text, re.M))
    planned = set(re.findall(r"^- \*\*(M\d\d)\*\*", text, re.M))  # "Planned rows": documented once built
    shared, doc = rows | planned, _doc_ids()
    assert shared <= doc  # every catalogue row; rows after its last ID are the project's own (new tasks)
    assert all(m > max(shared) for m in doc - shared)


def test_the_readme_layout_names_the_files_that_exist():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    package = block.split("conf/")[0]
    named = set(re.findall(r"[\w]+\.py", package))
    files = {p.name for p in (REPO / "safetrain").rglob("*.py")} - {"__main__.py"}
    assert named - files == set(), f"the layout names files that do not exist: {named - files}"
    assert files - named == set(), f"files the layout does not name: {files - named}"
