"""docs/methods.md is the method reference the code cites.

Checks: no file under capvqa/ or pipelines/ cites the old out-of-repo spec document; every section of
docs/methods.md that capvqa/, pipelines/ or README.md points at exists (GitHub anchor rules); the
sections other pages rely on are there; and its published-accuracy tables equal
:data:`capvqa.report.published.PUBLISHED`, so the page and the report never disagree.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from capvqa.report.published import DATASET_NAMES, PUBLISHED

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
SCANNED_DIRS = ("capvqa", "pipelines")
TEXT_SUFFIXES = frozenset({".py", ".yaml", ".yml", ".md", ".txt", ".toml", ".json", ".cfg"})

# The old citations looked like "<WORD> §1", "<WORD>:", "(<WORD>" and "<WORD>'s", with WORD the
# upper-case "spec": the word on its own. Identifiers that merely contain it (the dataset forms list in
# capvqa/data/datasets.py) are not citations and do not match. The word is assembled from pieces so that
# `grep -rn` for it over the tree shows real citations only, not this checker.
WORD = "SP" + "EC"
OLD_CITATION = re.compile(rf"{WORD} §|{WORD}:|\({WORD}|\b{WORD}\b")
# docs/methods.md#some-anchor
ANCHOR_CITATION = re.compile(r"docs/methods\.md#([\w-]+)")
# (``docs/methods.md``, "Section title") or docs/methods.md, "Section title"
TITLE_CITATION = re.compile(r"docs/methods\.md`*,\s*\"([^\"]+)\"")

REQUIRED_ANCHORS = (
    "pnp-vqa",
    "matching-gradcam",
    "question-guided-captioning",
    "fusion-in-decoder-reader",
    "img2llm",
    "the-img2llm-prompt",
    "pica",
    "example-selection",
    "vqa-accuracy",
    "data-formats",
    "deviations",
    "shared-deviations",
    "deviations-in-pnp-vqa",
    "deviations-in-img2llm",
    "deviations-in-pica",
)
PUBLISHED_SECTIONS = {
    "pnp-vqa": "pnp-vqa-published-accuracy",
    "img2llm": "img2llm-published-accuracy",
    "pica": "pica-published-accuracy",
    "blip2": "blip-2-published-accuracy",
    "frozen": "frozen-published-accuracy",
    "flamingo": "flamingo-published-accuracy",
}
NOT_REPORTED = frozenset({"", "—", "-", "–"})


# ------------------------------------------------------------------------------------------- helpers


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(markdown: str) -> list[tuple[int, str]]:
    """(line index, heading text) of every ATX heading outside fenced code blocks."""
    found, fenced = [], False
    for index, line in enumerate(markdown.splitlines()):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match and not fenced:
            found.append((index, match.group(1)))
    return found


def anchors(markdown: str) -> set[str]:
    """Every heading anchor, with GitHub's "-1", "-2" suffixes for repeated headings."""
    seen: Counter[str] = Counter()
    out = set()
    for _, text in headings(markdown):
        base = github_anchor(text)
        out.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


def scanned_files() -> list[Path]:
    files = []
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def lines_of(paths: list[Path]):
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            yield path.relative_to(ROOT), number, line


def section_table(markdown: str, anchor: str) -> list[list[str]]:
    """The cells of the first table under the heading with ``anchor``, header row first."""
    lines = markdown.splitlines()
    marks = headings(markdown)
    starts = [index for index, text in marks if github_anchor(text) == anchor]
    assert starts, f"docs/methods.md has no section #{anchor}"
    following = [index for index, _ in marks if index > starts[0]]
    end = following[0] if following else len(lines)
    rows = []
    for line in lines[starts[0] + 1 : end]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):  # skip the |---| separator
                rows.append(cells)
        elif rows:
            break
    return rows


@pytest.fixture(scope="module")
def methods_text() -> str:
    assert METHODS.is_file(), "docs/methods.md is missing; code comments cite its sections"
    return METHODS.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- tests


def test_anchor_rules_follow_github():
    assert github_anchor("Matching (GradCAM)") == "matching-gradcam"
    assert github_anchor("Official VQAv2 and OK-VQA files") == "official-vqav2-and-ok-vqa-files"
    assert github_anchor("Query context: caption and tags") == "query-context-caption-and-tags"
    assert github_anchor("Decoding, ensemble and post-processing") == "decoding-ensemble-and-post-processing"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_spec_pattern_catches_citations_but_not_identifiers():
    for cited in (f"({WORD} §1)", f"{WORD}: two", f"Input text ({WORD})", f"following {WORD}'s spacing"):
        assert OLD_CITATION.search(cited), cited
    for fine in (f"VALID_{WORD}S = (", "raise DataError(spec)", f"Dataset{WORD}S", "a dataset spec"):
        assert not OLD_CITATION.search(fine), fine


def test_no_file_cites_the_out_of_repo_spec():
    offenders = [
        f"{path}:{number}: {line.strip()}"
        for path, number, line in lines_of(scanned_files())
        if OLD_CITATION.search(line)
    ]
    assert not offenders, (
        f"these lines cite {WORD}, a document outside the repo; point at a docs/methods.md section instead "
        "(e.g. docs/methods.md#matching-gradcam):\n" + "\n".join(offenders)
    )


def test_every_cited_section_exists(methods_text):
    valid = anchors(methods_text)
    citations, missing = 0, []
    for path, number, line in lines_of([*scanned_files(), ROOT / "README.md"]):
        for anchor in ANCHOR_CITATION.findall(line):
            citations += 1
            if anchor not in valid:
                missing.append(f"{path}:{number}: docs/methods.md#{anchor}")
        for title in TITLE_CITATION.findall(line):
            citations += 1
            if github_anchor(title) not in valid:
                missing.append(f'{path}:{number}: docs/methods.md, "{title}"')
    assert citations > 10, "expected the code to cite docs/methods.md sections; did the pattern change?"
    assert not missing, (
        "these citations name sections docs/methods.md does not have:\n" + "\n".join(missing)
        + "\nvalid anchors: " + ", ".join(sorted(valid))
    )


def test_sections_other_pages_rely_on_exist(methods_text):
    valid = anchors(methods_text)
    assert [anchor for anchor in REQUIRED_ANCHORS if anchor not in valid] == []


def test_published_tables_equal_the_report_numbers(methods_text):
    dataset_keys = {name: key for key, name in DATASET_NAMES.items()}
    documented = set()
    for method, anchor in PUBLISHED_SECTIONS.items():
        header, *rows = section_table(methods_text, anchor)
        assert header[0] == "size", f"#{anchor}: the first column must be the size, got {header}"
        unknown = [name for name in header[1:] if name not in dataset_keys]
        assert not unknown, f"#{anchor}: columns {unknown} are not in DATASET_NAMES {sorted(dataset_keys)}"
        assert rows, f"#{anchor}: the table has no rows"
        for row in rows:
            assert len(row) == len(header), f"#{anchor}: row {row} does not match header {header}"
            for name, cell in zip(header[1:], row[1:]):
                if cell not in NOT_REPORTED:
                    documented.add((method, row[0], dataset_keys[name], round(float(cell), 2)))
    published = {(r.method, r.size, r.dataset, round(r.accuracy, 2)) for r in PUBLISHED}
    assert documented == published, (
        f"only in docs/methods.md: {sorted(documented - published)}; "
        f"only in capvqa/report/published.py: {sorted(published - documented)}"
    )
