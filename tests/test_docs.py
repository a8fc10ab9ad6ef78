"""docs/MATH.md is in the repository, and every citation of it in the code names a section it has."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
MATH = REPO / "docs" / "MATH.md"
NAME = "MATH" + ".md"  # spelled apart so that this file's own examples are not read as citations
SCANNED_DIRS = ["ibmd_fast", "csrc", "benchmarks", "export", "tests"]
SCANNED_ROOT = ["README.md", "setup.py", "CMakeLists.txt", "pyproject.toml"]
SUFFIXES = {".py", ".cpp", ".cu", ".cuh", ".h", ".md", ".txt", ".sh", ".toml", ".cfg"}

# "MATH.md 3", "MATH.md section 7", "MATH.md sections 3 and 6", "MATH.md (sections 2, 3, 4)",
# "MATH.md 2a, 2b"; a citation may run onto the next line of a comment ("#", "//", "*").
_GAP = r"(?:\s|#|//|\*)*"
_SECTION = r"\d+[a-z]?\b"
CITATION = re.compile(
    re.escape(NAME)
    + r"[,:]?"
    + _GAP
    + r"\(?"
    + _GAP
    + r"(?:sections?|§)?"
    + _GAP
    + rf"({_SECTION}(?:{_GAP}(?:,|and|&){_GAP}{_SECTION})*)"
)
HEADING = re.compile(r"^#{2,3} (\d+[a-z]?)\. ", re.MULTILINE)


def sections(text: str) -> list[str]:
    """The numbers of the numbered headings (``## 3. ...``, ``### 3a. ...``), in order."""
    return HEADING.findall(text)


def citations(text: str) -> list[tuple[int, str]]:
    """``(line, section)`` for every section number a text cites."""
    found = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.extend((line, number) for number in re.findall(_SECTION, match.group(1)))
    return found


def scanned_files() -> list[pathlib.Path]:
    files = [REPO / name for name in SCANNED_ROOT if (REPO / name).is_file()]
    for folder in SCANNED_DIRS:
        files.extend(
            p
            for p in sorted((REPO / folder).rglob("*"))
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        )
    return files


def test_math_md_has_its_sections_in_order():
    numbers = sections(MATH.read_text(encoding="utf-8"))
    assert numbers[:1] == ["1"] and len(numbers) == len(set(numbers)), numbers
    top = [int(n) for n in numbers if n.isdigit()]
    assert top == list(range(1, len(top) + 1)), f"top-level sections must run 1, 2, 3, ...: {top}"
    current = 0
    for number in numbers:
        if number.isdigit():
            current = int(number)
        else:
            assert int(number[:-1]) == current, f"subsection {number} sits under section {current}"


def test_every_citation_names_a_section_of_math_md():
    known = set(sections(MATH.read_text(encoding="utf-8")))
    cited, wrong = 0, []
    for path in scanned_files():
        for line, number in citations(path.read_text(encoding="utf-8", errors="replace")):
            cited += 1
            if number not in known:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {NAME} {number}")
    assert cited > 50, f"only {cited} citations found: is the pattern still right?"
    assert not wrong, f"citations of sections that {NAME} does not have ({sorted(known)}):\n" + "\n".join(wrong)


def test_the_citation_pattern():
    assert citations(f"x (MATH{'.md'} 3)") == [(1, "3")]
    assert [n for _, n in citations(f"{NAME} sections 3 and 6, {NAME} 2a, 4; {NAME} 5: Algorithm 1")] == [
        "3",
        "6",
        "2a",
        "4",
        "5",
    ]
    assert [n for _, n in citations(f"from {NAME} (sections 2, 3, 4)")] == ["2", "3", "4"]
    assert citations(f"use it ({NAME} section\n    # 5: only corrupted images)") == [(1, "5")]
    assert citations(f"we follow {NAME}.") == [] and citations(f"{NAME} 2.") == [(1, "2")]
    assert [n for _, n in citations(f"{NAME} 3; I2SB eq. 4 and {NAME} 2 with alpha = 1")] == ["3", "2"]
