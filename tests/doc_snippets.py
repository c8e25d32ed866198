"""The fenced code blocks of README.md and docs/*.md, for the tests that execute them.

A block is named by an HTML comment on the line right above its fence, ``<!-- snippet: name -->``,
else by the heading it sits under; ``<!-- needs: cuda -->`` (or ``torchrun``) there says what it
needs beyond a CPU. Several comments may stack above one fence. `snippet(path, name)` returns one
block; tests exec its ``code`` so that the documentation is what they run.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*```(\S*)\s*$")
COMMENT = re.compile(r"^\s*<!--\s*([\w-]+):\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root: "README.md", "docs/usage.md"
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    heading: str
    tags: tuple[tuple[str, str], ...]  # the comments above the fence, in order

    @property
    def name(self) -> str:
        return dict(self.tags).get("snippet", self.heading)

    @property
    def key(self) -> tuple[str, str]:
        return (self.path, self.name)

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(value for tag, value in self.tags if tag == "needs")

    def compiled(self):
        """The code as Python, named after its place in the documentation (tracebacks show it)."""
        return compile(self.code, f"{self.path}:{self.line}", "exec")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    rel = path.relative_to(ROOT).as_posix()
    found, heading, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            i += 1
            continue
        lang = fence.group(1)
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"),
            None,
        )
        if end is None:
            raise ValueError(f"{rel}:{i + 1}: unclosed code fence")
        tags, k = [], i - 1
        while k >= 0 and (comment := COMMENT.match(lines[k])):
            tags.insert(0, comment.groups())
            k -= 1
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        found.append(Block(rel, i + 1, lang, code, heading, tuple(tags)))
        i = end + 1
    return found


def blocks(lang: str | None = None) -> list[Block]:
    every = [block for path in doc_files() for block in blocks_of(path)]
    return [block for block in every if lang is None or block.lang == lang]


def snippet(path: str, name: str) -> Block:
    """The ```python block of `path` (relative to the repository root) named `name`."""
    candidates = [block for block in blocks_of(ROOT / path) if block.lang == "python"]
    matches = [block for block in candidates if block.name == name]
    if len(matches) != 1:
        names = sorted({block.name for block in candidates})
        raise LookupError(f"{path}: {len(matches)} python blocks named {name!r}; names: {names}")
    return matches[0]
