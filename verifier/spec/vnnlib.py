"""Strict reader for VNN-LIB property files (the subset used by VNN-COMP benchmarks).

Meaning of a VNN-LIB file
-------------------------
A VNN-LIB file asserts the **negation** of the property to verify: it describes the
counter-examples. The property is *violated* (the answer is ``sat``) iff there is an input
``x`` satisfying the input constraints whose network output ``y = f(x)`` satisfies the output
constraints. It *holds* (``unsat``) iff no such ``x`` exists.

What is read
------------
* comments: ``;`` to the end of the line;
* ``(declare-const X_i Real)`` for the inputs and ``(declare-const Y_j Real)`` for the outputs,
  indices contiguous from 0;
* ``(assert F)`` where ``F`` is built from ``(<= a b)``, ``(>= a b)``, ``(and F ...)`` and
  ``(or F ...)``, nested freely. ``a`` and ``b`` are a variable, a number (``3``, ``-0.5``,
  ``1e-3``, ``.5``) or the SMT negation ``(- 0.5)``. Several asserts form a conjunction.

An inequality may bound one input by a constant, or relate outputs and constants linearly
(``(<= Y_0 Y_1)``, ``(>= Y_2 3)``). Inequalities between two inputs, or between an input and
an output, are not supported.

Normal form
-----------
The formula is put in disjunctive normal form and each conjunction is split into its input
part (a box) and its output part (a linear system ``C y <= d``). Conjunctions with the same
input box are grouped into one :class:`Region`. The property is violated iff, for some region,
some ``x`` in ``[region.lower, region.upper]`` gives ``y = f(x)`` with ``C @ y <= d`` for some
``OutputConstraint`` of ``region.disjuncts``.

Errors
------
Everything else is rejected with :class:`VnnlibError`, whose message starts with
``file:line:``: unbalanced parentheses, unknown operators or symbols, bad numbers, strict
inequalities, undeclared or duplicate variables, non-contiguous indices, unbounded inputs,
empty input ranges, and files that constrain no output.
"""

from __future__ import annotations

import gc
import gzip
import os
import re
from dataclasses import dataclass, field

import numpy as np

try:  # join the package's error hierarchy when it is there
    from verifier.errors import VerifierError as _Base
except ImportError:  # pragma: no cover - only while the package is being assembled
    _Base = Exception

__all__ = [
    "VnnlibError",
    "OutputConstraint",
    "Region",
    "VnnlibSpec",
    "read_vnnlib",
    "parse_vnnlib",
]

# Guard against formulas whose normal form explodes (and of many ors).
MAX_DISJUNCTS = 100_000
MAX_DEPTH = 200


class VnnlibError(_Base, ValueError):
    """A VNN-LIB file that cannot be read or does not follow the supported grammar.

    The message reads ``name:line: what`` (or ``name: what`` when no line applies);
    the parts are also kept as ``name``, ``line`` (``None`` if not applicable) and ``reason``.
    """

    def __init__(self, name: str, line: int | None, reason: str):
        self.name = name
        self.line = line
        self.reason = reason
        where = f"{name}:{line}" if line is not None else f"{name}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable (e.g. across multiprocessing workers)
        return (type(self), (self.name, self.line, self.reason))


@dataclass(eq=False)
class OutputConstraint:
    """One conjunction of linear output constraints: ``C @ y <= d`` (all rows at once).

    ``C`` is ``[k, n_outputs]`` float64, ``d`` is ``[k]`` float64. Being a piece of a VNN-LIB
    file, it describes a *violation*: outputs satisfying every row are counter-examples.
    """

    C: np.ndarray
    d: np.ndarray

    def holds(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """True iff ``C @ y <= d + tol`` row-wise (``y`` is a counter-example output)."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        return bool(np.all(self.C @ y <= self.d + tol))

    def __repr__(self) -> str:
        return f"OutputConstraint(rows={self.C.shape[0]}, n_outputs={self.C.shape[1]})"


@dataclass(eq=False)
class Region:
    """An input box with the output conditions that violate the property inside it.

    The property is violated iff some ``x`` with ``lower <= x <= upper`` yields ``y = f(x)``
    satisfying ANY of ``disjuncts`` (each a conjunction ``C @ y <= d``).
    """

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: list[OutputConstraint] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Region(n_inputs={self.lower.shape[0]}, disjuncts={len(self.disjuncts)})"


@dataclass(eq=False)
class VnnlibSpec:
    """A VNN-LIB file in normal form: a disjunction of :class:`Region`.

    The file states the negation of the property: the property is violated (``sat``) iff
    some region has an ``x`` in its box whose output satisfies one of its conjunctions.
    """

    n_inputs: int
    n_outputs: int
    regions: list[Region]
    path: str | None = None

    @property
    def n_disjuncts(self) -> int:
        """Total number of output conjunctions over all regions."""
        return sum(len(r.disjuncts) for r in self.regions)

    def __repr__(self) -> str:
        name = os.path.basename(self.path) if self.path else None
        return (f"VnnlibSpec({name!r}: inputs={self.n_inputs}, outputs={self.n_outputs}, "
                f"regions={len(self.regions)}, disjuncts={self.n_disjuncts})")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_vnnlib(path: str | os.PathLike) -> VnnlibSpec:
    """Read a ``.vnnlib`` file (or a gzip-compressed ``.vnnlib.gz``) into a :class:`VnnlibSpec`.

    Raises :class:`VnnlibError` (naming the file, and the line where one applies) on any
    problem, a missing or unreadable file included.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise VnnlibError(name, None, f"cannot read file: {e.strerror or e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise VnnlibError(name, None, f"corrupt gzip file: {e}") from e
    if name.endswith((".onnx", ".onnx.gz", ".pt", ".pth", ".ckpt")) or b"\x00" in raw[:4096]:
        raise VnnlibError(name, None, "a binary file (a model?), not a VNN-LIB property: MODEL "
                                      "and SPEC swapped? the model comes first")
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise VnnlibError(name, line, "file is not valid UTF-8 text") from e
    spec = parse_vnnlib(text, name=name)
    spec.path = name
    return spec


def parse_vnnlib(text: str, name: str = "<string>") -> VnnlibSpec:
    """Parse VNN-LIB source ``text``; ``name`` stands for the file in error messages.

    The result's ``path`` is None (:func:`read_vnnlib` sets it). See the module docstring for
    the grammar and the meaning of the result: the property is violated iff some region has
    an ``x`` in its box whose output ``y`` satisfies one of its conjunctions ``C @ y <= d``.
    """
    # The parse allocates many small acyclic containers; the cyclic garbage collector would
    # walk them again and again for nothing (it roughly triples the time on large files).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _Parser(text, name).parse()
    finally:
        if gc_was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# Tokenizer and s-expressions
# ---------------------------------------------------------------------------------------------
#
# Tokens are '(', ')' and atoms (maximal runs of characters other than whitespace, parentheses
# and ';'); ';' starts a comment that runs to the end of the line. For speed, tokens are made
# by C-level string operations and positions are token indices; the line of a token is only
# computed (by rescanning with _TOKEN_RE, which splits the text the same way) for an error.

_COMMENT_RE = re.compile(r";[^\n]*")
_TOKEN_RE = re.compile(r"[()]|[^\s();]+|;[^\n]*")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_VAR_RE = re.compile(r"([XY])_(0|[1-9][0-9]*)\Z")

# An s-expression list is a Python list ``[span, item, item, ...]`` where ``span`` is
# ``[index of its '(' token, index of its ')' token]`` and items are lists or atom strings.

# Atom kinds used inside the normal form.
# input bound:  ("in", var_index, is_upper, value, tok)
# output row:   ("out", ((index, coef), ...), rhs, tok)      meaning  sum coef*y[index] <= rhs


def _item_tok(node: list, j: int) -> int:
    """Token index of ``node[j]`` (j >= 1)."""
    k = node[0][0] + 1
    for item in node[1:j]:
        k = k + 1 if item.__class__ is str else item[0][1] + 1
    return k


def _tok_of(x) -> int | None:
    return x[0][0] if x.__class__ is list else None


class _Parser:
    def __init__(self, text: str, name: str):
        self.text = text
        self.name = name
        self.decls: dict[str, int] = {}  # variable name -> token index of its declaration
        self.vars: dict[str, tuple] = {}  # variable name -> (kind 'X'/'Y', index, decl token)
        self.ntok = 0
        self._offsets: list[int] | None = None

    # -- errors --------------------------------------------------------------------------------

    def line_of(self, tok: int) -> int:
        """Line (1-based) of token number ``tok``; past the last token: the last line."""
        if self._offsets is None:
            self._offsets = [m.start() for m in _TOKEN_RE.finditer(self.text)
                             if m.group()[0] != ";"]
        offs = self._offsets
        off = offs[tok] if tok < len(offs) else len(self.text.rstrip())
        return self.text.count("\n", 0, off) + 1

    def error(self, tok: int | None, reason: str) -> VnnlibError:
        return VnnlibError(self.name, None if tok is None else self.line_of(tok), reason)

    # -- structure -----------------------------------------------------------------------------

    def read_forms(self) -> list:
        """Tokenize and build the list of top-level s-expressions (iteratively)."""
        text = _COMMENT_RE.sub("", self.text)
        tokens = text.replace("(", " ( ").replace(")", " ) ").split()
        self.ntok = len(tokens)
        top: list = []
        stack: list = []
        cur = top
        for k, tok in enumerate(tokens):
            if tok == "(":
                node = [[k, -1]]
                cur.append(node)
                stack.append(node)
                cur = node
            elif tok == ")":
                if not stack:
                    raise self.error(k, "unbalanced parentheses: stray ')' with no matching '('")
                stack.pop()[0][1] = k
                cur = stack[-1] if stack else top
            else:
                if not stack:
                    raise self.error(k, f"unexpected {tok!r} outside parentheses")
                cur.append(tok)
        if stack:
            raise self.error(stack[0][0][0], "unbalanced parentheses: this '(' is never closed")
        return top

    # -- top level -----------------------------------------------------------------------------

    def parse(self) -> VnnlibSpec:
        forms = self.read_forms()
        asserts: list = []
        for form in forms:  # all top-level items are lists (atoms were rejected above)
            head = self.head(form, "a command")
            if head == "declare-const":
                self.declare(form)
            elif head == "assert":
                if len(form) != 3:
                    raise self.error(form[0][0], f"assert takes exactly one formula, "
                                                 f"got {len(form) - 2}")
                asserts.append(form)
            else:
                raise self.error(form[0][0], f"unknown command {head!r} (expected "
                                             f"'declare-const' or 'assert')")

        self.n_inputs = self.count_vars("X", "input")
        self.n_outputs = self.count_vars("Y", "output")
        if not asserts:
            raise self.error(self.ntok, "no assert in the file (nothing is constrained)")

        # Top-level asserts are a conjunction.
        dnf = self.conjoin([self.formula(a[2], a, 2, 0) for a in asserts], asserts[0][0][0])
        return self.build(dnf, asserts)

    def head(self, node, what: str, parent=None, j: int = 0) -> str:
        if node.__class__ is str:
            raise self.error(_item_tok(parent, j),
                             f"expected {what} in parentheses, got {node!r}")
        if len(node) == 1:
            raise self.error(node[0][0], f"empty parentheses '()' where {what} was expected")
        first = node[1]
        if first.__class__ is not str:
            raise self.error(first[0][0], f"expected an operator name after '(' in {what}, "
                                          f"got a parenthesized expression")
        return first

    def declare(self, form: list) -> None:
        if len(form) != 4 or form[2].__class__ is not str or form[3].__class__ is not str:
            raise self.error(form[0][0], "expected (declare-const NAME Real)")
        var, typ = form[2], form[3]
        vtok = form[0][0] + 2
        if typ != "Real":
            raise self.error(vtok + 1, f"variable {var} has type {typ!r}; only 'Real' is "
                                       f"supported")
        m = _VAR_RE.match(var)
        if not m:
            raise self.error(vtok, f"bad variable name {var!r}: inputs must be named X_i "
                                   f"and outputs Y_j (i, j = 0, 1, ...)")
        if var in self.decls:
            raise self.error(vtok, f"duplicate declaration of {var} (first declared at line "
                                   f"{self.line_of(self.decls[var])})")
        self.decls[var] = vtok
        self.vars[var] = (m.group(1), int(m.group(2)), vtok)

    def count_vars(self, prefix: str, what: str) -> int:
        idx = {i: t for (kind, i, t) in self.vars.values() if kind == prefix}
        if not idx:
            raise self.error(self.ntok if self.ntok else None,
                             f"no {what} variable declared (expected "
                             f"(declare-const {prefix}_0 Real) ...)")
        n = max(idx) + 1
        if len(idx) != n:
            missing = min(set(range(n)) - set(idx))
            raise self.error(idx[n - 1], f"non-contiguous {what} indices: {prefix}_{n - 1} is "
                                         f"declared but {prefix}_{missing} is not")
        return n

    # -- formulas to DNF -----------------------------------------------------------------------
    #
    # A DNF is a list of terms; a term is (chunks, tok): ``chunks`` a tuple of atom lists whose
    # union is the conjunction (lists are shared between terms, so the large common part of a
    # file, e.g. thousands of input bounds, is stored and summarized once); ``tok`` the token
    # of the innermost 'or' branch the term came from (None if none), for error messages.

    def formula(self, node, parent: list, j: int, depth: int) -> list:
        """DNF of ``node``, which is ``parent[j]``."""
        op = self.head(node, "a formula such as (<= a b), (and ...) or (or ...)", parent, j)
        tok = node[0][0]
        if depth > MAX_DEPTH:
            raise self.error(tok, "formula nested too deeply")
        if op == "<=" or op == ">=":
            if len(node) != 4:
                raise self.error(tok, f"'{op}' takes exactly 2 operands, got {len(node) - 2}")
            if op == "<=":
                atom = self.inequality(node, 2, 3)
            else:
                atom = self.inequality(node, 3, 2)
            return [(([atom],), None)]
        if op == "and" or op == "or":
            if len(node) == 2:
                raise self.error(tok, f"'({op})' with no operand")
            if op == "and":
                return self.conjoin([self.formula(node[i], node, i, depth + 1)
                                     for i in range(2, len(node))], tok)
            out = []
            for i in range(2, len(node)):
                x = node[i]
                branch = _tok_of(x)
                for chunks, t in self.formula(x, node, i, depth + 1):
                    out.append((chunks, branch if t is None else t))
                if len(out) > MAX_DISJUNCTS:
                    raise self.error(tok, f"more than {MAX_DISJUNCTS} disjuncts")
            return out
        if op == "<" or op == ">":
            raise self.error(tok, f"strict inequality '{op}' is not VNN-LIB (use '{op}=')")
        raise self.error(tok, f"unknown operator {op!r} (supported: <=, >=, and, or)")

    def conjoin(self, dnfs: list, tok: int) -> list:
        single: list = []
        multi: list = []
        for d in dnfs:
            (multi if len(d) > 1 else single).append(d)
        if len(single) == 1 and len(single[0][0][0]) == 1:
            base = single[0][0][0][0]
        else:
            base = [atom for d in single for chunk in d[0][0] for atom in chunk]
        bt = None
        for d in single:
            if d[0][1] is not None:
                bt = d[0][1] if bt is None else max(bt, d[0][1])
        terms = [((base,), bt)]
        for d in multi:
            if len(terms) * len(d) > MAX_DISJUNCTS:
                raise self.error(tok, f"the disjunctive normal form has more than "
                                      f"{MAX_DISJUNCTS} disjuncts")
            terms = [(c1 + c2, t1 if t2 is None else (t2 if t1 is None else max(t1, t2)))
                     for c1, t1 in terms for c2, t2 in d]
        return terms

    def operand(self, node: list, j: int, at: int):
        """Operand ``node[j]``: (kind, value) with kind 'X' / 'Y' (value = index) or 'c'."""
        item = node[j]
        if item.__class__ is not str:
            if len(item) == 3 and item[1] == "-" and item[2].__class__ is str:
                kind, val = self.operand(item, 2, at)
                if kind == "c":
                    return "c", -val
            raise self.error(item[0][0], "unsupported operand: expected a variable, a number "
                                         "or (- NUMBER)")
        v = self.vars.get(item)
        if v is not None:
            if v[2] > at:
                raise self.error(_item_tok(node, j), f"variable {item} used before its "
                                                     f"declaration (line {self.line_of(v[2])})")
            return v[0], v[1]
        if _NUMBER_RE.match(item):
            val = float(item)
            if val == val and abs(val) != float("inf"):
                return "c", val
            raise self.error(_item_tok(node, j), f"number {item} is out of range")
        tokj = _item_tok(node, j)
        if _VAR_RE.match(item):
            raise self.error(tokj, f"undeclared variable {item}")
        if item[0] in "0123456789+-.":
            raise self.error(tokj, f"bad number {item!r}")
        if item[0] in "XY" and "_" in item:
            raise self.error(tokj, f"bad variable name {item!r}: expected X_i or Y_j "
                                   f"(i, j = 0, 1, ... without leading zeros)")
        raise self.error(tokj, f"unknown symbol {item!r} (variables must be named X_i or Y_j)")

    def inequality(self, node: list, ja: int, jb: int):
        """The atom for ``node[ja] <= node[jb]``."""
        tok = node[0][0]
        ka, va = self.operand(node, ja, tok)
        kb, vb = self.operand(node, jb, tok)
        if ka == "X":
            if kb == "c":
                return ("in", va, True, vb, tok)  # x <= c
        elif kb == "X":
            if ka == "c":
                return ("in", vb, False, va, tok)  # c <= x
        elif ka == "Y":
            if kb == "c":
                return ("out", ((va, 1.0),), vb, tok)
            return ("out", ((va, 1.0), (vb, -1.0)), 0.0, tok)  # y_a - y_b <= 0
        elif kb == "Y":
            return ("out", ((vb, -1.0),), -va, tok)  # c <= y  ->  -y <= -c
        else:
            raise self.error(tok, "comparison between two constants")
        if ka == "X" and kb == "X":
            raise self.error(tok, "constraints between two inputs are not supported "
                                  "(only constant bounds on each X_i)")
        raise self.error(tok, "constraints mixing inputs and outputs are not supported")

    # -- normal form to regions ----------------------------------------------------------------

    def summarize(self, chunk: list):
        """Box and rows of one atom list: lo, lo_tok, hi, hi_tok, C, d (token -1: no bound)."""
        n, m = self.n_inputs, self.n_outputs
        inf = float("inf")
        lo = [-inf] * n
        hi = [inf] * n
        lo_tok = [-1] * n
        hi_tok = [-1] * n
        rows = []
        for atom in chunk:
            if atom[0] == "in":
                _, i, upper, v, t = atom
                if upper:
                    if v < hi[i] or hi_tok[i] < 0:
                        hi[i] = v
                        hi_tok[i] = t
                elif v > lo[i] or lo_tok[i] < 0:
                    lo[i] = v
                    lo_tok[i] = t
            else:
                rows.append(atom)
        C = np.zeros((len(rows), m))
        d = np.empty(len(rows))
        for r, (_, coefs, rhs, _t) in enumerate(rows):
            for j, c in coefs:
                C[r, j] += c
            d[r] = rhs
        return (np.array(lo, dtype=np.float64), np.array(lo_tok, dtype=np.int64),
                np.array(hi, dtype=np.float64), np.array(hi_tok, dtype=np.int64), C, d)

    def term_parts(self, chunks: tuple, cache: dict):
        """Box (with the token of each tightest bound, -1 if none) and rows of one term."""
        n = self.n_inputs
        lo = np.full(n, -np.inf)
        hi = np.full(n, np.inf)
        lo_tok = np.full(n, -1, dtype=np.int64)
        hi_tok = np.full(n, -1, dtype=np.int64)
        Cs, ds = [], []
        for chunk in chunks:
            s = cache.get(id(chunk))
            if s is None:
                s = cache[id(chunk)] = self.summarize(chunk)
            clo, clo_tok, chi, chi_tok, C, d = s
            tighter = (clo > lo) | ((clo_tok >= 0) & (lo_tok < 0))
            lo = np.where(tighter, clo, lo)
            lo_tok = np.where(tighter, clo_tok, lo_tok)
            tighter = (chi < hi) | ((chi_tok >= 0) & (hi_tok < 0))
            hi = np.where(tighter, chi, hi)
            hi_tok = np.where(tighter, chi_tok, hi_tok)
            if len(d):
                Cs.append(C)
                ds.append(d)
        return lo, lo_tok, hi, hi_tok, Cs, ds

    def unbounded(self, dnf: list, cache: dict, tpos, i: int, side: int, count: int):
        """The error for input ``i`` lacking a bound (side 1: lower, 3: upper) in a term."""
        name = "lower" if side == 1 else "upper"
        more = f", and {count - 1} more input(s) without one" if count > 1 else ""
        # Bounded in some other disjunct: point at this disjunct; else at the declaration.
        elsewhere = tpos is not None and any(
            self.term_parts(chunks, cache)[side][i] >= 0 for chunks, _ in dnf)
        if elsewhere:
            return self.error(tpos, f"unbounded input X_{i} (no {name} bound) in this "
                                    f"disjunct{more}")
        # the line is that of the declaration
        return self.error(self.decls[f"X_{i}"], f"unbounded input X_{i} (no {name} bound)"
                                                f"{more}")

    def build(self, dnf: list, asserts: list) -> VnnlibSpec:
        cache: dict[int, tuple] = {}
        regions: dict[bytes, Region] = {}
        seen: dict[bytes, set] = {}
        any_output = False
        no_output_at = None
        for chunks, tpos in dnf:
            lo, lo_tok, hi, hi_tok, Cs, ds = self.term_parts(chunks, cache)
            for side, toks in ((1, lo_tok), (3, hi_tok)):
                missing = np.flatnonzero(toks < 0)
                if missing.size:
                    raise self.unbounded(dnf, cache, tpos, int(missing[0]), side, missing.size)
            empty = np.flatnonzero(lo > hi)
            if empty.size:
                i = int(empty[0])
                raise self.error(int(max(lo_tok[i], hi_tok[i])),
                                 f"empty range for input X_{i}: lower bound "
                                 f"{float(lo[i])!r} > upper bound {float(hi[i])!r}")
            if not ds:
                if no_output_at is None:
                    no_output_at = tpos if tpos is not None else asserts[0][0][0]
                continue
            any_output = True
            C = np.concatenate(Cs, axis=0) if len(Cs) > 1 else Cs[0].copy()
            d = np.concatenate(ds) if len(ds) > 1 else ds[0].copy()
            lo = lo + 0.0  # -0.0 -> 0.0 so that equal boxes have equal bytes
            hi = hi + 0.0
            key = lo.tobytes() + hi.tobytes()
            region = regions.get(key)
            if region is None:
                region = regions[key] = Region(lower=lo, upper=hi, disjuncts=[])
                seen[key] = set()
            ckey = C.tobytes() + d.tobytes()
            if ckey not in seen[key]:  # drop repeated conjunctions (same rows, same order)
                seen[key].add(ckey)
                region.disjuncts.append(OutputConstraint(C=C, d=d))
        if not any_output:
            raise self.error(asserts[-1][0][0], "no output is constrained (no assert "
                                                "mentions any Y_j)")
        if no_output_at is not None:
            raise self.error(no_output_at, "this disjunct constrains no output Y_j")
        return VnnlibSpec(n_inputs=self.n_inputs, n_outputs=self.n_outputs,
                          regions=list(regions.values()), path=None)
