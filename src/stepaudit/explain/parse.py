"""Safe parsing of a small arithmetic expression into an expression tree.

The text is checked for size and nesting *before* ``ast.parse`` sees it, then the
AST is walked against a whitelist.  Nothing is ever evaluated, compiled to code,
or passed to ``eval``/``exec``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

MAX_CHARS = 1000
MAX_BRACKET_DEPTH = 20
MAX_DEPTH = 60
MAX_NODES = 150
MAX_VARS = 10

# name -> (min args, max args or None for "any number")
FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "exp": (1, 1),
    "log": (1, 1),
    "sqrt": (1, 1),
    "abs": (1, 1),
    "sin": (1, 1),
    "cos": (1, 1),
    "tanh": (1, 1),
    "sigmoid": (1, 1),
    "relu": (1, 1),
    "max": (2, None),
    "min": (2, None),
}
BINARY = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.Pow: "pow"}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}
_REFUSED_OPERATORS = {
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
}
_REFUSED_KINDS = {
    ast.Attribute: "attribute access is",
    ast.Subscript: "subscripts are",
    ast.Lambda: "lambdas are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are",
    ast.Compare: "comparisons are",
    ast.BoolOp: "boolean operators are",
    ast.IfExp: "conditional expressions are",
    ast.NamedExpr: "assignments are",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
    ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are",
    ast.Tuple: "tuples are",
    ast.List: "lists are",
    ast.Dict: "dicts are",
    ast.Set: "sets are",
    ast.Starred: "starred arguments are",
    ast.Slice: "slices are",
}


class ExplainError(ValueError):
    """A one-line, user-facing error (bad expression, bad point, undefined value)."""


@dataclass(frozen=True)
class Expr:
    """One node of the expression tree: a constant, a variable, an operator or a function call."""

    op: str  # "const", "var", "neg", one of BINARY's values, or a FUNCTIONS name
    args: tuple[Expr, ...] = ()
    value: float | None = None  # for "const"
    name: str | None = None  # for "var"
    text: str = field(default="", compare=False)  # source snippet, for messages and labels
    col: int = field(default=0, compare=False)  # 1-based column of the snippet in the input


def snippet(text: str, limit: int = 40) -> str:
    """``text`` shortened to ``limit`` characters for one-line messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Source(str):
    """The stripped source text, remembering how many leading spaces were removed."""

    lead: int = 0


def _fail(what: str, source: str, node: ast.AST) -> ExplainError:
    seg = ast.get_source_segment(source, node) or ""
    return ExplainError(f"{what}: {snippet(seg)!r} (col {_col(node, source)})")


def _precheck(source: str) -> None:
    """Refuse oversized, non-printable or too deeply bracketed text before parsing it."""
    if not isinstance(source, str):
        raise ExplainError(f"the expression must be a string, not {type(source).__name__}")
    if len(source) > MAX_CHARS:
        raise ExplainError(
            f"expression is too long: {len(source):,} characters (limit {MAX_CHARS:,}); "
            f"it runs on past col {MAX_CHARS}: {snippet(source[MAX_CHARS : MAX_CHARS + 20], 20)!r}"
        )
    if not source.strip():
        raise ExplainError("the expression is empty")
    depth = 0
    for i, ch in enumerate(source):
        if ch != " " and not ("!" <= ch <= "~"):
            raise ExplainError(f"character {ch!r} is not allowed (col {i + 1})")
        if ch in "([{":
            depth += 1
            if depth > MAX_BRACKET_DEPTH:
                raise ExplainError(
                    f"brackets nested too deeply: more than {MAX_BRACKET_DEPTH} levels: "
                    f"{snippet(source[i:], 20)!r} (col {i + 1})"
                )
        elif ch in ")]}":
            depth -= 1


def _check_shape(tree: ast.AST, source: str) -> None:
    """Count nodes and measure depth iteratively, so a huge tree is refused without recursion."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, ast.expr):
            count += 1
            if count > MAX_NODES:
                raise _fail(f"expression is too large: more than {MAX_NODES} nodes", source, node)
            if depth > MAX_DEPTH:
                raise _fail(f"expression is nested too deeply: more than {MAX_DEPTH} levels", source, node)
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + isinstance(node, ast.expr)))


def parse(source: str) -> Expr:
    """Parse ``source`` into an :class:`Expr`, refusing anything outside the whitelist."""
    _precheck(source)
    src = _Source(source.strip())
    src.lead = len(source) - len(source.lstrip())
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        at_end = not e.offset or e.offset > len(src)
        col = " (at the end)" if at_end else f" (col {e.offset + src.lead})"
        raise ExplainError(f"not a valid expression: {e.msg}{col}") from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as e:
        raise ExplainError(f"not a valid expression: {type(e).__name__}") from None
    _check_shape(tree, src)
    expr = _convert(tree.body, src)
    names = variables(expr)
    if len(names) > MAX_VARS:
        raise ExplainError(f"too many variables: {len(names)} (limit {MAX_VARS}): {', '.join(names)}")
    return expr


def _col(node: ast.AST, src: str) -> int:
    return getattr(node, "col_offset", 0) + 1 + getattr(src, "lead", 0)


def _convert(node: ast.AST, src: str) -> Expr:
    seg = ast.get_source_segment(src, node) or ""
    col = _col(node, src)
    if isinstance(node, ast.Constant):
        return _constant(node, src)
    if isinstance(node, ast.Name):
        if node.id.startswith("__") or node.id.endswith("__"):
            raise _fail("dunder names are not allowed", src, node)
        if node.id in FUNCTIONS:
            raise _fail(f"{node.id!r} is a function; call it like {node.id}(x)", src, node)
        return Expr("var", name=node.id, text=seg, col=col)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return Expr("neg", (_convert(node.operand, src),), text=seg, col=col)
        if isinstance(node.op, ast.UAdd):
            return _convert(node.operand, src)
        sym = "not" if isinstance(node.op, ast.Not) else "~"
        raise _fail(f"operator {sym!r} is not allowed", src, node)
    if isinstance(node, ast.BinOp):
        kind = type(node.op)
        if kind not in BINARY:
            raise _fail(f"operator {_REFUSED_OPERATORS.get(kind, kind.__name__)!r} is not allowed", src, node)
        return Expr(BINARY[kind], (_convert(node.left, src), _convert(node.right, src)), text=seg, col=col)
    if isinstance(node, ast.Call):
        return _call(node, src, seg)
    for kind, what in _REFUSED_KINDS.items():
        if isinstance(node, kind):
            raise _fail(f"{what} not allowed", src, node)
    raise _fail(f"{type(node).__name__} is not allowed", src, node)


def _constant(node: ast.Constant, src: str) -> Expr:
    v = node.value
    if isinstance(v, (str, bytes)):
        raise _fail("strings are not allowed", src, node)
    if isinstance(v, bool) or v is None or v is Ellipsis:
        raise _fail("only numbers are allowed as constants", src, node)
    if isinstance(v, complex):
        raise _fail("complex numbers are not allowed", src, node)
    try:
        x = float(v)
    except OverflowError:
        raise _fail("number is too large", src, node) from None
    if x != x or x in (float("inf"), float("-inf")):
        raise _fail("number is too large", src, node)
    return Expr("const", value=x, text=ast.get_source_segment(src, node) or repr(x), col=_col(node, src))


def _call(node: ast.Call, src: str, seg: str) -> Expr:
    if not isinstance(node.func, ast.Name):
        if isinstance(node.func, ast.Attribute):
            raise _fail("attribute access is not allowed", src, node.func)
        raise _fail("only calls to named functions are allowed", src, node)
    name = node.func.id
    if name not in FUNCTIONS:
        raise _fail(f"function {name!r} is not allowed (allowed: {', '.join(FUNCTIONS)})", src, node)
    if node.keywords:
        raise _fail("keyword arguments are not allowed", src, node.keywords[0].value)
    for a in node.args:
        if isinstance(a, ast.Starred):
            raise _fail("starred arguments are not allowed", src, a)
    lo, hi = FUNCTIONS[name]
    n = len(node.args)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}"
        raise _fail(f"{name}() takes {want} argument{'s' if lo != 1 else ''}, got {n}", src, node)
    return Expr(name, tuple(_convert(a, src) for a in node.args), text=seg, col=_col(node, src))


def variables(expr: Expr) -> list[str]:
    """Variable names in order of first appearance (left to right)."""
    seen: dict[str, None] = {}

    def walk(e: Expr) -> None:
        if e.op == "var":
            seen.setdefault(e.name, None)  # type: ignore[arg-type]
        for a in e.args:
            walk(a)

    walk(expr)
    return list(seen)
