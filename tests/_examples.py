"""The command-line examples of README.md, docs/**/*.md and the entry points' docstrings
(their --help texts), as argument lists: what tests/cli/test_documented_examples.py runs.

An example is any shell command `python[3] launch/<tool>.py ...` in a fenced or indented
code block, an inline code span (which may wrap lines), or a docstring line (with its `\\`
continuations). Synopsis notation is read as the flags it shows: `[--x=1]` is `--x=1`,
`...` is dropped, and `{a,b}` gives one example per choice.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_TOOL = re.compile(r"^launch/(\w+)\.py$")
_FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_SEPARATORS = {"&&", "||", ";", "|", "&"}
_CHOICES = re.compile(r"^\{([\w,]+)\}$")


@dataclass(frozen=True)
class Example:
    source: str  # file:line
    tool: str  # train, tpu, report, ...
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: python launch/{self.tool}.py {shlex.join(self.args)}"


def _commands(text: str) -> list[list[str]]:
    """Token lists of the `launch/<tool>.py` commands in one shell snippet."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if "launch/" not in line:
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _SEPARATORS:
                segment.append(token)
                continue
            for i, word in enumerate(segment[:-1]):
                if re.fullmatch(r"python3?", word) and _TOOL.match(segment[i + 1]):
                    found.append(segment[i + 1 :])
            segment = []
    return found


def _clean(tokens: list[str]) -> list[list[str]]:
    """Synopsis notation to argument lists: [..] unwrapped, '...' dropped, {a,b} expanded."""
    variants: list[list[str]] = [[]]
    for token in tokens:
        token = token.strip("[]")
        if not token or token.strip(".") == "" or token in ("flags", "--flags"):
            continue
        choices = _CHOICES.match(token)
        options = choices.group(1).split(",") if choices else [token]
        variants = [v + [o] for v in variants for o in options]
    return variants


def _examples(source: str, snippet: str) -> list[Example]:
    out = []
    for tokens in _commands(snippet):
        tool = _TOOL.match(tokens[0]).group(1)
        for args in _clean(tokens[1:]):
            out.append(Example(source, tool, tuple(args)))
    return out


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def from_markdown(path: Path) -> list[Example]:
    text = path.read_text()
    name = path.relative_to(REPO).as_posix()
    out, rest = [], text
    for block in _FENCE.finditer(text):
        out += _examples(f"{name}:{_line(text, block.start())}", block.group(1))
        rest = rest.replace(block.group(0), "\n" * block.group(0).count("\n"), 1)
    for i, line in enumerate(rest.splitlines(), 1):  # indented code blocks
        if line.startswith("    ") and "launch/" in line and "`" not in line:
            out += _examples(f"{name}:{i}", line)
    for span in _INLINE.finditer(rest):
        code = span.group(1).replace("\n", " ")
        out += _examples(f"{name}:{_line(rest, span.start())}", code)
    return out


def from_docstring(path: Path) -> list[Example]:
    """The module docstring is the tool's --help text: its inline code spans, then its
    other lines (the indented examples)."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    source = f"{path.relative_to(REPO).as_posix()} (--help)"
    out = [e for m in _INLINE.finditer(doc) for e in _examples(source, m.group(1))]
    return out + _examples(source, _INLINE.sub(" ", doc))


def all_examples() -> list[Example]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    clis = sorted((REPO / "thack_jax" / "cli").glob("*.py"))
    found = [e for p in docs for e in from_markdown(p)]
    found += [e for p in clis for e in from_docstring(p)]
    return found
