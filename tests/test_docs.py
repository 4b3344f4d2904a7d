"""README.md and docs/*.md stay findable and true to the code: relative links resolve (files and GitHub
heading anchors), code blocks marked ``# examples/NAME.py`` are excerpts of that script (which the tests
execute), README.md stays short, and every docs page is linked from README.md. No process group; well under a
second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_WORDS = 1500

LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")  # inline links and images; the text may span lines
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXCERPT_MARK = re.compile(r"^# (examples/[\w\-]+\.py)$")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            out.append((no, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, '-' and ' ' kept),
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose_lines(md.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def relative_links(md: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is not a URL, outside code blocks and code spans."""
    lines = prose_lines(md.read_text())
    text = "\n".join(INLINE_CODE.sub(lambda m: " " * len(m.group()), line) for _, line in lines)
    starts: list[int] = [0]
    for _, line in lines:
        starts.append(starts[-1] + len(line) + 1)
    out: list[tuple[int, str]] = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I):  # http:, https:, mailto:
            continue
        index = max(i for i, s in enumerate(starts[:-1]) if s <= m.start(1))
        out.append((lines[index][0], target))
    return out


def broken_links(md: Path) -> list[str]:
    """Each relative link of md whose file does not exist, or whose #anchor names no heading of its .md
    file."""
    out: list[str] = []
    for no, target in relative_links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        where = f"{md.name}:{no}: {target}"
        if not dest.exists():
            out.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where} (no heading with that anchor in {dest.name})")
    return out


def python_blocks(md: Path) -> list[tuple[int, list[str]]]:
    """(line number of the opening fence, lines) of each ```python block."""
    out: list[tuple[int, list[str]]] = []
    block: list[str] | None = None
    start = 0
    for no, line in enumerate(md.read_text().splitlines(), 1):
        if block is None and line.strip() in ("```python", "```py"):
            block, start = [], no
        elif block is not None and line.strip().startswith("```"):
            out.append((start, block))
            block = None
        elif block is not None:
            block.append(line)
    return out


def excerpt_error(block: list[str], source: list[str]) -> str | None:
    """None when the block's lines (trailing whitespace stripped, '...' lines skipped) are a subsequence of
    the source's lines (trailing whitespace stripped); otherwise the first line not found in order."""
    lines = [line.rstrip() for line in source]
    at = 0
    for line in (b.rstrip() for b in block):
        if line.strip() == "...":
            continue
        try:
            at = lines.index(line, at) + 1
        except ValueError:
            return f"not found (in order) in the file: {line!r}"
    return None


def excerpt_errors(md: Path, root: Path = ROOT) -> list[str]:
    """Each ```python block of md whose first line is '# examples/NAME.py' and is not an excerpt of that
    file."""
    out: list[str] = []
    for no, block in python_blocks(md):
        m = EXCERPT_MARK.match(block[0].rstrip()) if block else None
        if not m:
            continue
        source = root / m.group(1)
        if not source.is_file():
            out.append(f"{md.name}:{no}: {m.group(1)} does not exist")
        elif error := excerpt_error(block[1:], source.read_text().splitlines()):
            out.append(f"{md.name}:{no}: {m.group(1)}: {error}")
    return out


def words(md: Path) -> int:
    return len(md.read_text().split())


def links_to(md: Path) -> set[Path]:
    """The files md's relative links point to."""
    return {(md.parent / target.partition("#")[0]).resolve() for _, target in relative_links(md)}


def unlinked_pages(readme: Path, docs: Path) -> list[str]:
    """docs/*.md pages no link of README.md points to."""
    linked = links_to(readme)
    return [p.name for p in sorted(docs.glob("*.md")) if p.resolve() not in linked]


# ----------------------------------------------------------------------------- the checks on this repository


def test_relative_links_resolve() -> None:
    assert [b for md in pages() for b in broken_links(md)] == []


def test_marked_blocks_are_excerpts_of_examples() -> None:
    assert [e for md in pages() for e in excerpt_errors(md)] == []


def test_readme_is_short() -> None:
    count = words(README)
    assert count <= README_MAX_WORDS, f"README.md has {count} words (at most {README_MAX_WORDS})"


def test_every_docs_page_is_linked_from_readme() -> None:
    assert sorted(DOCS.glob("*.md")), "docs/ has no pages"
    assert unlinked_pages(README, DOCS) == []


def test_docs_pages_link_back_to_readme() -> None:
    assert [p.name for p in sorted(DOCS.glob("*.md")) if README.resolve() not in links_to(p)] == []


# ----------------------------------------------------------------------------- each check can fail


def test_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "examples").mkdir()
    demo = "import torch\n\n\ndef main() -> None:\n    x = 1\n    y = 2\n"
    (tmp_path / "examples" / "demo.py").write_text(demo)
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Tensor parallel × data parallel\n\n"
        "[ok](../README.md) [ok](#tensor-parallel--data-parallel)\n"
        "[gone](../nope.md) [bad](../README.md#nope)\n"
        "[web](https://example.com/x) `[code](nope.md)`\n\n"
        "```python\n# examples/demo.py\nimport torch\n...\n    y = 2\n```\n\n"
        "```python\n# examples/demo.py\n    y = 2\n    x = 1\n```\n\n"
        "```python\n# examples/missing.py\n```\n\n"
        "```python\nlayers[0](nope.md)\n```\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text("# R\n\n## Usage\n\n" + "word " * (README_MAX_WORDS + 1) + "\n")

    assert [b.split(": ", 1)[1] for b in broken_links(page)] == [
        "../nope.md (no such file)", "../README.md#nope (no heading with that anchor in README.md)"]
    errors = excerpt_errors(page, tmp_path)
    assert len(errors) == 2 and "'    x = 1'" in errors[0] and "missing.py does not exist" in errors[1]
    assert words(readme) > README_MAX_WORDS
    assert unlinked_pages(readme, tmp_path / "docs") == ["page.md"]
    readme.write_text("# R\n\nSee [the page](docs/page.md#page).\n")
    assert unlinked_pages(readme, tmp_path / "docs") == [] and broken_links(readme) == []
