"""The built-in mixed-domain corpus: three domains of different kind, built from what every
Python installation has, so a mixture trains with no download (docs/data.md).

    code     the standard library's .py sources with docstrings and comments removed
    prose    the standard library's docstrings and comments, and pydoc's topic texts
    headers  C headers: CPython's include directory, and /usr/include/*.h where present

`code` and `prose` come from one pass over the standard library (ast for the docstrings,
tokenize for the comments), kept for the life of the process: a mixture with both reads and
tokenises the library once. Nothing is cached on disk. Every domain yields (document id, text)
in a fixed order (sorted paths, sorted topic names), so the corpus, and the split by document
id hash, is the same on every run of one installation.
"""

from __future__ import annotations

import ast
import functools
import io
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sparse_train.data.corpus import stdlib_files, stdlib_root
from sparse_train.errors import DataError

# Comments that are directives to tools or the interpreter, not English.
_DIRECTIVES = ("!", "-*-", "noqa", "type:", "pragma", "fmt:", "pylint:", "XXX", "TODO")
# A comment paragraph counts as prose when it has this many words and this share of letters and
# spaces: commented-out code and ASCII diagrams fall below it.
_MIN_WORDS = 3
_MIN_LETTER_SHARE = 0.7
# Where C headers are looked for besides CPython's own include directory.
SYSTEM_INCLUDE = Path("/usr/include")


@dataclass(frozen=True)
class SplitSource:
    """One Python source split in two: the code without docstrings and comments, and the prose
    parts (docstrings and comment paragraphs, in source order)."""

    code: str
    prose: list[str]


# ---- splitting one source ---------------------------------------------------------------------
_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Fields of a statement that hold statements. Definitions sit only in statement lists, never
# inside expressions (a lambda has no docstring), so walking these alone finds them all, at a
# fraction of ast.walk's cost over every expression node.
_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstring_owners(tree: ast.Module) -> list[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every module, class and function whose body opens with a docstring."""
    found = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _OWNERS) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    found.append(node)
        for field in _BODIES:
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(children)
    return found


def _char_col(line: str, byte_col: int) -> int:
    """ast counts columns in UTF-8 bytes, tokenize in characters."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def _offsets(lines: list[str]) -> list[int]:
    """Absolute offset of the start of each line (1-based rows, as ast and tokenize count)."""
    starts = [0, 0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    return starts


def _prose_comment(paragraph: list[str]) -> str | None:
    text = " ".join(paragraph).strip()
    if len(text.split()) < _MIN_WORDS:
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return text if letters >= _MIN_LETTER_SHARE * len(text) else None


def _clean_docstring(doc: str) -> str:
    # doctest examples are code, not prose
    kept = [line for line in doc.splitlines() if not line.lstrip().startswith((">>>", "... "))]
    return "\n".join(kept).strip()


def split_source(text: str) -> SplitSource:
    """Cut `text` (a Python module) into code and prose. Docstrings are found by ast (the first
    string statement of a module, class or function), comments by tokenize (a `#` inside a
    string is not one). A docstring that is its body's only statement becomes `pass`, so the
    code still parses. Raises SyntaxError (or tokenize.TokenError) on invalid Python."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    starts = _offsets(lines)

    def offset(row: int, col: int) -> int:
        return starts[row] + col

    cuts: list[tuple[int, int, str]] = []  # (start, end, replacement) in character offsets
    prose: list[tuple[int, str]] = []  # (row, text), sorted into source order at the end
    for owner in _docstring_owners(tree):
        stmt = owner.body[0]
        start = offset(stmt.lineno, _char_col(lines[stmt.lineno - 1], stmt.col_offset))
        end = offset(stmt.end_lineno, _char_col(lines[stmt.end_lineno - 1], stmt.end_col_offset))
        cuts.append((start, end, "pass" if len(owner.body) == 1 else ""))
        if doc := _clean_docstring(ast.get_docstring(owner, clean=True) or ""):
            prose.append((stmt.lineno, doc))
    for row, col, end_col, comment in _comments(text):
        cuts.append((offset(row, col), offset(row, end_col), ""))
        if comment:
            prose.append((row, comment))
    return SplitSource(_apply_cuts(text, cuts), [t for _, t in sorted(prose, key=lambda p: p[0])])


def _comments(text: str) -> Iterator[tuple[int, int, int, str | None]]:
    """(row, start column, end column, prose or None) per comment token. Comments on
    consecutive lines form one paragraph, whose prose is given on its last line (None on the
    others, and on a paragraph that is not prose)."""
    paragraph: list[str] = []
    pending: tuple[int, int, int] | None = None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        if pending is not None:
            if row != pending[0] + 1:  # a gap ends the paragraph
                yield (*pending, _prose_comment(paragraph))
                paragraph = []
            else:
                yield (*pending, None)
        body = tok.string.lstrip("#").strip()
        if body and not body.startswith(_DIRECTIVES):
            paragraph.append(body)
        pending = (row, col, tok.end[1])
    if pending is not None:
        yield (*pending, _prose_comment(paragraph))


def _apply_cuts(text: str, cuts: list[tuple[int, int, str]]) -> str:
    """`text` without the cut spans; lines left blank by a cut are dropped, trailing spaces
    before a cut comment trimmed. Lines blank in the source stay (they separate code blocks)."""
    pieces, pos = [], 0
    for start, end, replacement in sorted(cuts):
        pieces.append(text[pos:start])
        pieces.append(replacement if replacement else "\0")  # marks a line a cut touched
        pos = end
    pieces.append(text[pos:])
    out = []
    for line in "".join(pieces).splitlines():
        if "\0" in line:
            line = line.replace("\0", "").rstrip()
            if not line.strip():
                continue
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


# ---- the domains ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _stdlib_split() -> tuple[tuple[str, SplitSource], ...]:
    """Every standard-library source split once per process (code and prose share the pass)."""
    return tuple(split_files(stdlib_files(), stdlib_root()))


def split_files(files: Iterable[Path], root: Path) -> Iterator[tuple[str, SplitSource]]:
    """(path relative to root, split) per file; a file that is not valid Python for this
    interpreter (a few stdlib files are templates or other versions' syntax) is left out."""
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise DataError(f"{f}: cannot read ({err.strerror})") from None
        try:
            split = split_source(text)
        except (SyntaxError, ValueError, tokenize.TokenError):
            continue
        yield str(f.relative_to(root)), split


def code_documents(splits: Iterable[tuple[str, SplitSource]]) -> Iterator[tuple[str, str]]:
    for rel, split in splits:
        if split.code.strip():
            yield f"stdlib/{rel}", split.code


def prose_documents(splits: Iterable[tuple[str, SplitSource]], topics: bool = True) -> Iterator[tuple[str, str]]:
    """One document per source file (its docstrings and comments, blank-line separated), then
    one per pydoc topic (the language reference's sections, as `help('TOPIC')` shows them)."""
    for rel, split in splits:
        if split.prose:
            yield f"stdlib/{rel}", "\n\n".join(split.prose) + "\n"
    if topics:
        from pydoc_data.topics import topics as pydoc_topics

        for name in sorted(pydoc_topics):
            yield f"topics/{name}", pydoc_topics[name]


def header_roots() -> list[tuple[Path, str]]:
    """(folder, glob) pairs searched for C headers, in order."""
    return [(Path(sysconfig.get_paths()["include"]), "**/*.h"), (SYSTEM_INCLUDE, "*.h")]


def header_documents(roots: list[tuple[Path, str]] | None = None) -> list[tuple[str, str]]:
    """Every header under the roots (sorted within each root); DataError when there is none."""
    roots = header_roots() if roots is None else roots
    docs = []
    for folder, pattern in roots:
        if not folder.is_dir():
            continue
        for f in sorted(p for p in folder.glob(pattern) if p.is_file()):
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise DataError(f"built-in domain 'headers': {f}: cannot read ({err.strerror})") from None
            docs.append((f"headers/{folder.name}/{f.relative_to(folder)}", text))
    if not docs:
        where = ", ".join(f"{folder}/{pattern}" for folder, pattern in roots)
        raise DataError(f"built-in domain 'headers': no C headers found (looked in {where})")
    return docs


def domain_documents(name: str) -> list[tuple[str, str]]:
    """The (document id, text) pairs of one built-in domain (config.BUILTIN_DOMAINS)."""
    if name == "code":
        return list(code_documents(_stdlib_split()))
    if name == "prose":
        return list(prose_documents(_stdlib_split()))
    if name == "headers":
        return header_documents()
    raise DataError(f"unknown built-in domain {name!r}; known: code, prose, headers")


def describe_domain(name: str) -> str:
    """What a domain was built from, for TokenData.source."""
    if name == "headers":
        return "C headers (" + ", ".join(f"{folder}/{pattern}" for folder, pattern in header_roots()) + ")"
    what = {"code": "code without docstrings and comments", "prose": "docstrings, comments and pydoc topics"}
    return f"Python standard library {what[name]} ({stdlib_root()})"
