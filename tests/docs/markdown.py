"""Reading the repository's Markdown as a newcomer's tools would: its files, links, headings'
anchors (GitHub's rules), tables and code blocks. Pure functions; the tests are beside it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Not the repository's own text: installed packages, caches, a stack's runtime files.
SKIPPED = {".git", ".venv", ".venv.lock", "node_modules", "var", "build"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the target may be in <…>.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
RUNNABLE = "<!-- runnable -->"


def markdown_files(root: Path = ROOT) -> list[Path]:
    """Every *.md of the repository, outside installed packages and runtime files."""
    found = []
    for path in sorted(root.rglob("*.md")):
        parts = path.relative_to(root).parts
        if not any(p in SKIPPED or p.endswith(".egg-info") for p in parts):
            found.append(path)
    return found


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of everything outside fenced code blocks, inline code removed."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1)[0] * 3 if fence is None else None
            continue
        if fence is None:
            yield number, _INLINE_CODE.sub("", line)


def links(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image in the prose."""
    for number, line in _prose_lines(text):
        for pattern in (_INLINE_LINK, _REFERENCE, _HTML_LINK):
            for m in pattern.finditer(line):
                yield number, m.group(1)


def is_external(target: str) -> bool:
    return bool(_SCHEME.match(target)) or target.startswith("//")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a link into this file may name (repeated headings get -1, -2, …)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _prose_lines(text):
        found.update(_EXPLICIT_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_snippets(path: Path) -> list[Snippet]:
    """The fenced blocks right after a `<!-- runnable -->` line (blank lines between allowed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != RUNNABLE:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        m = _FENCE.match(lines[j]) if j < len(lines) else None
        assert m, f"{path.relative_to(ROOT)}:{i + 1}: {RUNNABLE} is not followed by a code block"
        end = next(k for k in range(j + 1, len(lines)) if lines[k].strip() == m.group(1))
        found.append(Snippet(path, j + 1, m.group(2).strip(), "\n".join(lines[j + 1 : end]) + "\n"))
    return found


def table_first_column(text: str, section: str) -> list[str]:
    """The first cells (backticks stripped) of the tables under the heading `## {section}`,
    header rows left out."""
    inside, cells, in_table = False, [], False
    for line in text.splitlines():
        if line.startswith("#"):
            inside = line.lstrip("#").strip() == section
        is_row = line.startswith("|")
        if inside and is_row and in_table:
            first = line.strip("|").split("|")[0].strip()
            if not set(first) <= set("-: "):
                cells.append(first.strip("`"))
        in_table = is_row
    return cells
