"""Tests of the strict VNN-LIB reader (verifier.spec.vnnlib).

Reminder of the meaning: a VNN-LIB file describes counter-examples; the property is violated
iff some x in some region's box gives y = f(x) with C @ y <= d for one of its conjunctions.
"""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pytest

from verifier.spec.vnnlib import (
    OutputConstraint,
    Region,
    VnnlibError,
    VnnlibSpec,
    parse_vnnlib,
    read_vnnlib,
)

SHARED = Path(__file__).resolve().parents[3] / "shared"
VNNCOMP = SHARED / "benchmarks" / "vnncomp"

DECL_2_2 = """\
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
"""
BOX_2 = """\
(assert (>= X_0 0))
(assert (<= X_0 1))
(assert (>= X_1 -1))
(assert (<= X_1 2))
"""


def write(tmp_path: Path, text: str, name: str = "spec.vnnlib") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def rows(oc: OutputConstraint) -> set[tuple]:
    """The conjunction as a set of (coefficients..., rhs) rows, order-free."""
    return {tuple(c) + (dv,) for c, dv in zip(oc.C.tolist(), oc.d.tolist())}


def expect_error(tmp_path: Path, text: str, line: int | None, *fragments: str,
                 name: str = "bad.vnnlib") -> VnnlibError:
    p = write(tmp_path, text, name)
    with pytest.raises(VnnlibError) as info:
        read_vnnlib(p)
    msg = str(info.value)
    prefix = f"{p}:{line}:" if line is not None else f"{p}:"
    assert msg.startswith(prefix), msg
    assert info.value.line == line
    for frag in fragments:
        assert frag in msg, msg
    assert isinstance(info.value, ValueError)
    return info.value


# ---------------------------------------------------------------------------------------------
# Accepted forms
# ---------------------------------------------------------------------------------------------

def test_single_box_single_conjunction(tmp_path):
    spec = read_vnnlib(write(tmp_path, DECL_2_2 + BOX_2 + "(assert (<= Y_0 3))\n"
                                                          "(assert (>= Y_1 0.5))\n"))
    assert isinstance(spec, VnnlibSpec)
    assert (spec.n_inputs, spec.n_outputs) == (2, 2)
    assert spec.path == str(tmp_path / "spec.vnnlib")
    assert len(spec.regions) == 1
    r = spec.regions[0]
    assert isinstance(r, Region)
    assert r.lower.dtype == np.float64 and r.upper.dtype == np.float64
    np.testing.assert_array_equal(r.lower, [0.0, -1.0])
    np.testing.assert_array_equal(r.upper, [1.0, 2.0])
    assert len(r.disjuncts) == 1
    oc = r.disjuncts[0]
    assert oc.C.shape == (2, 2) and oc.d.shape == (2,)
    assert oc.C.dtype == np.float64 and oc.d.dtype == np.float64
    # (<= Y_0 3) -> y0 <= 3 ; (>= Y_1 0.5) -> -y1 <= -0.5
    assert rows(oc) == {(1.0, 0.0, 3.0), (0.0, -1.0, -0.5)}
    assert oc.holds([3.0, 0.5]) and not oc.holds([3.1, 0.5]) and not oc.holds([0.0, 0.4])


def test_or_over_outputs(tmp_path):
    text = DECL_2_2 + BOX_2 + """
(assert (or
    (and (<= Y_0 Y_1))
    (and (>= Y_0 5) (<= Y_1 -2))
))
"""
    spec = parse_vnnlib(text, "x.vnnlib")
    assert spec.path is None
    assert len(spec.regions) == 1
    ds = spec.regions[0].disjuncts
    assert len(ds) == 2
    assert rows(ds[0]) == {(1.0, -1.0, 0.0)}
    assert rows(ds[1]) == {(-1.0, 0.0, -5.0), (0.0, 1.0, -2.0)}


def test_y_y_comparisons(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (>= Y_0 Y_1))\n(assert (<= Y_1 Y_0))\n"
    spec = parse_vnnlib(text)
    (oc,) = spec.regions[0].disjuncts
    # (>= Y_0 Y_1) is the row -y0 + y1 <= 0 (twice, the second from (<= Y_1 Y_0)).
    np.testing.assert_array_equal(oc.C, [[-1.0, 1.0], [-1.0, 1.0]])
    np.testing.assert_array_equal(oc.d, [0.0, 0.0])


def test_constant_on_the_left(tmp_path):
    text = DECL_2_2 + BOX_2.replace("(>= X_0 0)", "(<= 0.25 X_0)") + "(assert (>= 4 Y_1))\n"
    spec = parse_vnnlib(text)
    assert spec.regions[0].lower[0] == 0.25
    assert rows(spec.regions[0].disjuncts[0]) == {(0.0, 1.0, 4.0)}


def test_two_input_boxes_each_with_own_outputs():
    text = DECL_2_2 + """
(assert (or
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 0))
    (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (>= Y_1 7))
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_1 Y_0))
))
"""
    spec = parse_vnnlib(text)
    assert len(spec.regions) == 2  # the first and third disjuncts share their box
    a, b = spec.regions
    np.testing.assert_array_equal(a.lower, [0, 0])
    np.testing.assert_array_equal(a.upper, [1, 1])
    np.testing.assert_array_equal(b.lower, [2, 0])
    np.testing.assert_array_equal(b.upper, [3, 1])
    assert [rows(oc) for oc in a.disjuncts] == [{(1.0, 0.0, 0.0)}, {(-1.0, 1.0, 0.0)}]
    assert [rows(oc) for oc in b.disjuncts] == [{(0.0, -1.0, -7.0)}]


def test_acasxu_prop6_form_cross_product():
    """Inputs: an or of two boxes; outputs: an or in a separate assert."""
    text = DECL_2_2 + """
(assert (or
    (and (<= X_0 1) (>= X_0 0) (<= X_1 1) (>= X_1 0))
    (and (<= X_0 1) (>= X_0 0) (<= X_1 -1) (>= X_1 -2))
))
(assert (or (and (<= Y_1 Y_0)) (and (<= Y_0 -3) (<= Y_1 -3))))
"""
    spec = parse_vnnlib(text)
    assert len(spec.regions) == 2
    for r in spec.regions:
        assert [rows(oc) for oc in r.disjuncts] == [{(-1.0, 1.0, 0.0)},
                                                    {(1.0, 0.0, -3.0), (0.0, 1.0, -3.0)}]
    np.testing.assert_array_equal(spec.regions[1].lower, [0, -2])
    np.testing.assert_array_equal(spec.regions[1].upper, [1, -1])


def test_two_output_ors_multiply():
    text = DECL_2_2 + BOX_2 + """
(assert (or (<= Y_0 1) (<= Y_0 2)))
(assert (or (<= Y_1 3) (<= Y_1 4)))
"""
    spec = parse_vnnlib(text)
    (r,) = spec.regions
    got = [rows(oc) for oc in r.disjuncts]
    want = [{(1.0, 0.0, a), (0.0, 1.0, b)} for a in (1.0, 2.0) for b in (3.0, 4.0)]
    assert sorted(map(sorted, got)) == sorted(map(sorted, want))


def test_nested_and_and_or():
    text = DECL_2_2 + """
(assert (and (and (>= X_0 0) (and (<= X_0 1)))
             (and (>= X_1 0) (<= X_1 1))))
(assert (and (or (and (<= Y_0 0) (and (<= Y_1 0))) (>= Y_0 9))))
"""
    spec = parse_vnnlib(text)
    (r,) = spec.regions
    assert [rows(oc) for oc in r.disjuncts] == [{(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)},
                                                {(-1.0, 0.0, -9.0)}]


def test_numbers_negative_smt_minus_and_scientific():
    text = """\
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const Y_0 Real)
(assert (>= X_0 (- 0.5)))
(assert (<= X_0 -0.25))
(assert (>= X_1 1e-3))
(assert (<= X_1 2.5E+2))
(assert (>= X_2 -7))
(assert (<= X_2 .5))
(assert (<= Y_0 (- 3)))
"""
    spec = parse_vnnlib(text)
    r = spec.regions[0]
    np.testing.assert_array_equal(r.lower, [-0.5, 1e-3, -7.0])
    np.testing.assert_array_equal(r.upper, [-0.25, 250.0, 0.5])
    assert rows(r.disjuncts[0]) == {(1.0, -3.0)}


def test_comments_and_layout():
    text = """; header (with parens
;; (assert (<= Y_0 1000))
(declare-const X_0 Real) ; trailing comment )
(declare-const
   Y_0
   Real)
(assert ; a comment inside a form
  (<= X_0 1)) (assert (>= X_0 0))
(assert (<= Y_0 2));no space before the comment
"""
    spec = parse_vnnlib(text)
    r = spec.regions[0]
    assert (r.lower[0], r.upper[0]) == (0.0, 1.0)
    assert [rows(oc) for oc in r.disjuncts] == [{(1.0, 2.0)}]


def test_crlf_line_endings(tmp_path):
    text = "(declare-const X_0 Real)\r\n(declare-const Y_0 Real)\r\n(assert (<= X_0 1))\r\n" \
           "(assert (<= Y_0 1))\r\n"
    p = tmp_path / "crlf.vnnlib"
    p.write_bytes(text.encode())
    with pytest.raises(VnnlibError, match=r"crlf\.vnnlib:1: unbounded input X_0 \(no lower"):
        read_vnnlib(p)


def test_repeated_bounds_are_intersected():
    text = """\
(declare-const X_0 Real)
(declare-const Y_0 Real)
(assert (>= X_0 -3))
(assert (>= X_0 -1))
(assert (>= X_0 -2))
(assert (<= X_0 5))
(assert (<= X_0 0.5))
(assert (and (<= X_0 4) (<= Y_0 0)))
"""
    r = parse_vnnlib(text).regions[0]
    assert (r.lower[0], r.upper[0]) == (-1.0, 0.5)


def test_point_box_is_allowed():
    text = "(declare-const X_0 Real)(declare-const Y_0 Real)" \
           "(assert (>= X_0 2))(assert (<= X_0 2))(assert (<= Y_0 0))"
    r = parse_vnnlib(text).regions[0]
    assert r.lower[0] == r.upper[0] == 2.0


def test_repr_is_short():
    spec = parse_vnnlib(DECL_2_2 + BOX_2 + "(assert (or (<= Y_0 0) (<= Y_1 0)))")
    s = repr(spec)
    assert "inputs=2" in s and "outputs=2" in s and "regions=1" in s and "disjuncts=2" in s
    assert len(s) < 200 and "\n" not in s


def test_gzip(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_0 Y_1))\n"
    p = tmp_path / "spec.vnnlib.gz"
    p.write_bytes(gzip.compress(text.encode()))
    spec = read_vnnlib(p)
    assert spec.n_inputs == 2 and spec.path == str(p)
    # errors in a gzipped file still name the file and the line
    bad = tmp_path / "bad.vnnlib.gz"
    bad.write_bytes(gzip.compress((DECL_2_2 + BOX_2 + "(assert (<= Y_0 Y_7))\n").encode()))
    with pytest.raises(VnnlibError, match=r"bad\.vnnlib\.gz:9: undeclared variable Y_7"):
        read_vnnlib(bad)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "c.vnnlib.gz"
    p.write_bytes(gzip.compress(b"(declare-const X_0 Real)")[:-6])
    with pytest.raises(VnnlibError, match=re.escape(str(p))):
        read_vnnlib(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.vnnlib"
    with pytest.raises(VnnlibError) as info:
        read_vnnlib(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_vnnlib_name_in_errors():
    with pytest.raises(VnnlibError, match=r"^<string>:1: "):
        parse_vnnlib("(declare-const X_0 Real))")
    with pytest.raises(VnnlibError, match=r"^mine:1: "):
        parse_vnnlib("(declare-const X_0 Real))", name="mine")


# ---------------------------------------------------------------------------------------------
# Errors: each names the file and the right line
# ---------------------------------------------------------------------------------------------

def test_error_unbounded_input_no_lower(tmp_path):
    text = DECL_2_2 + "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n" \
                      "(assert (<= Y_0 0))\n"
    # points at the declaration of X_1 (line 2)
    expect_error(tmp_path, text, 2, "unbounded input X_1 (no lower bound)")


def test_error_unbounded_input_no_upper(tmp_path):
    text = DECL_2_2 + "(assert (>= X_0 0))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n" \
                      "(assert (<= Y_0 0))\n"
    expect_error(tmp_path, text, 1, "unbounded input X_0 (no upper bound)")


def test_error_unbounded_input_in_one_disjunct(tmp_path):
    text = DECL_2_2 + """(assert (or
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0))
))
(assert (<= Y_0 0))
"""
    expect_error(tmp_path, text, 7, "unbounded input X_1 (no upper bound)", "disjunct")


def test_error_empty_range(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_0 0))\n(assert (>= X_1 5))\n"
    expect_error(tmp_path, text, 10, "empty range", "X_1", "lower", "upper")


def test_error_empty_range_upper_last(tmp_path):
    text = DECL_2_2 + "(assert (>= X_0 1))\n(assert (<= X_0 0))\n" \
                      "(assert (>= X_1 0))\n(assert (<= X_1 0))\n(assert (<= Y_0 0))\n"
    expect_error(tmp_path, text, 6, "empty range for input X_0")


def test_error_undeclared_variable(tmp_path):
    text = DECL_2_2 + BOX_2 + "\n(assert (<= Y_2 0))\n"
    expect_error(tmp_path, text, 10, "undeclared variable Y_2")


def test_error_used_before_declaration(tmp_path):
    text = "(declare-const X_0 Real)\n(assert (<= Y_0 0))\n(declare-const Y_0 Real)\n" \
           "(assert (<= X_0 0))\n(assert (>= X_0 0))\n"
    expect_error(tmp_path, text, 2, "Y_0 used before its declaration (line 3)")


def test_error_duplicate_declaration(tmp_path):
    text = DECL_2_2 + "(declare-const X_1 Real)\n" + BOX_2 + "(assert (<= Y_0 0))\n"
    expect_error(tmp_path, text, 5, "duplicate declaration of X_1", "line 2")


def test_error_unclosed_paren(tmp_path):
    text = DECL_2_2 + "(assert (>= X_0 0))\n(assert (<= X_0 1)\n(assert (>= X_1 0))\n" \
                      "(assert (<= X_1 1))\n"
    expect_error(tmp_path, text, 6, "unbalanced parentheses", "never closed")


def test_error_stray_close_paren(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_0 0)))\n"
    expect_error(tmp_path, text, 9, "unbalanced parentheses", "stray ')'")


@pytest.mark.parametrize("num", ["1.2.3", "1e", "0x10", "1_000", "--1", "1e5.0", "+-2"])
def test_error_bad_number(tmp_path, num):
    text = DECL_2_2 + BOX_2 + f"(assert\n  (<= Y_0 {num}))\n"
    expect_error(tmp_path, text, 10, "bad number", num)


@pytest.mark.parametrize("num", ["1e999", "-1e400"])
def test_error_number_out_of_range(tmp_path, num):
    text = DECL_2_2 + BOX_2 + f"(assert (<= Y_0 {num}))\n"
    expect_error(tmp_path, text, 9, "out of range")


@pytest.mark.parametrize("sym", ["nan", "inf", "foo", "x_0", "y_1"])
def test_error_unknown_symbol(tmp_path, sym):
    text = DECL_2_2 + BOX_2 + f"(assert (<= Y_0 {sym}))\n"
    expect_error(tmp_path, text, 9, "unknown symbol", sym)


@pytest.mark.parametrize("op", ["=", "not", "=>", "distinct", "+"])
def test_error_unknown_operator(tmp_path, op):
    text = DECL_2_2 + BOX_2 + f"(assert ({op} Y_0 1))\n"
    expect_error(tmp_path, text, 9, "unknown operator", op)


@pytest.mark.parametrize("op", ["<", ">"])
def test_error_strict_inequality(tmp_path, op):
    text = DECL_2_2 + BOX_2 + f"(assert (or (<= Y_0 1)\n (and ({op} Y_0 1))))\n"
    expect_error(tmp_path, text, 10, "strict inequality", op)


def test_error_unknown_command(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_0 1))\n(check-sat)\n"
    expect_error(tmp_path, text, 10, "unknown command 'check-sat'")


@pytest.mark.parametrize("name", ["Z_0", "X0", "X_01", "X_-1", "X_a", "Xs_0"])
def test_error_bad_variable_name(tmp_path, name):
    text = DECL_2_2 + f"\n(declare-const {name} Real)\n"
    expect_error(tmp_path, text, 6, "bad variable name", name)


def test_error_bad_variable_name_in_use(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_01 1))\n"
    expect_error(tmp_path, text, 9, "bad variable name 'Y_01'")


def test_error_bad_type(tmp_path):
    text = "(declare-const X_0 Int)\n"
    expect_error(tmp_path, text, 1, "only 'Real'")


def test_error_non_contiguous_inputs(tmp_path):
    text = "(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)\n"
    expect_error(tmp_path, text, 2, "non-contiguous input", "X_1")


def test_error_non_contiguous_outputs(tmp_path):
    text = "(declare-const X_0 Real)\n(declare-const Y_1 Real)\n"
    expect_error(tmp_path, text, 2, "non-contiguous output", "Y_0")


def test_error_no_outputs_declared(tmp_path):
    text = "(declare-const X_0 Real)\n(assert (<= X_0 1))\n"
    expect_error(tmp_path, text, 2, "no output variable declared")


def test_error_no_output_constrained(tmp_path):
    text = DECL_2_2 + BOX_2
    expect_error(tmp_path, text, 8, "no output is constrained")


def test_error_no_output_in_one_disjunct(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (or\n (<= Y_0 1)\n (and (<= X_0 0.5))))\n"
    expect_error(tmp_path, text, 11, "constrains no output")


def test_error_empty_file(tmp_path):
    expect_error(tmp_path, "", None, "no input variable declared")
    expect_error(tmp_path, "; only a comment\n", None, "no input variable declared")


def test_error_no_assert(tmp_path):
    expect_error(tmp_path, DECL_2_2, 4, "no assert")


def test_error_input_input(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= X_0 X_1))\n(assert (<= Y_0 0))\n"
    expect_error(tmp_path, text, 9, "two inputs")


@pytest.mark.parametrize("cmp", ["(<= X_0 Y_1)", "(>= Y_0 X_1)"])
def test_error_input_output_mix(tmp_path, cmp):
    text = DECL_2_2 + BOX_2 + f"(assert (<= Y_0 0))\n(assert {cmp})\n"
    expect_error(tmp_path, text, 10, "mixing inputs and outputs")


def test_error_two_constants(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= 1 2))\n"
    expect_error(tmp_path, text, 9, "two constants")


@pytest.mark.parametrize("formula", ["(<= Y_0)", "(<= Y_0 1 2)", "(and)", "(or)", "()",
                                     "((<= Y_0 1))", "Y_0", "(<= Y_0 (+ 1 2))",
                                     "(<= Y_0 (- Y_1))"])
def test_error_malformed_formula(tmp_path, formula):
    text = DECL_2_2 + BOX_2 + f"(assert {formula})\n"
    expect_error(tmp_path, text, 9)


def test_error_assert_arity(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_0 1) (<= Y_1 1))\n"
    expect_error(tmp_path, text, 9, "exactly one formula")


def test_error_atom_outside_parens(tmp_path):
    text = DECL_2_2 + "assert\n"
    expect_error(tmp_path, text, 5, "outside parentheses")


def test_error_deep_nesting(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert " + "(and " * 500 + "(<= Y_0 1)" + ")" * 500 + ")\n"
    expect_error(tmp_path, text, 9, "nested too deeply")


# ---------------------------------------------------------------------------------------------
# Real VNN-COMP files
# ---------------------------------------------------------------------------------------------

def _real_files() -> list[Path]:
    return sorted(VNNCOMP.glob("*/vnnlib/*.vnnlib")) + sorted(VNNCOMP.glob("*/vnnlib/*.gz"))


def _need_real():
    if not VNNCOMP.is_dir() or not _real_files():
        pytest.skip(f"no VNN-COMP benchmarks under {VNNCOMP}")


def _simple_bounds(text: str, n: int):
    """Independent reading of files made only of single-bound asserts on inputs."""
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    found = re.findall(r"^\(assert \((<=|>=) X_(\d+) ([-+.0-9eE]+)\)\)", text, re.M)
    for op, i, v in found:
        if op == "<=":
            hi[int(i)] = min(hi[int(i)], float(v))
        else:
            lo[int(i)] = max(lo[int(i)], float(v))
    return lo, hi, len(found)


def test_real_files_parse():
    _need_real()
    files = _real_files()
    for f in files:
        spec = read_vnnlib(f)
        text = f.read_text() if f.suffix != ".gz" else gzip.decompress(f.read_bytes()).decode()
        n_x = len(set(re.findall(r"\(declare-const X_(\d+) Real\)", text)))
        n_y = len(set(re.findall(r"\(declare-const Y_(\d+) Real\)", text)))
        assert (spec.n_inputs, spec.n_outputs) == (n_x, n_y), f
        assert spec.regions, f
        for r in spec.regions:
            assert r.lower.shape == r.upper.shape == (n_x,)
            assert np.all(np.isfinite(r.lower)) and np.all(np.isfinite(r.upper)), f
            assert np.all(r.lower <= r.upper), f
            assert r.disjuncts, f
            for oc in r.disjuncts:
                assert oc.C.ndim == 2 and oc.C.shape[1] == n_y and oc.C.shape[0] >= 1
                assert oc.d.shape == (oc.C.shape[0],)
                assert np.all(np.isfinite(oc.C)) and np.all(np.isfinite(oc.d))
        lo, hi, n_simple = _simple_bounds(text, n_x)
        if n_simple == len(re.findall(r"\((?:<=|>=) X_\d+ ", text)):
            # every input bound is a top-level assert: one box, equal to the independent read
            assert len(spec.regions) == 1, f
            np.testing.assert_array_equal(spec.regions[0].lower, lo, err_msg=str(f))
            np.testing.assert_array_equal(spec.regions[0].upper, hi, err_msg=str(f))


def test_real_acasxu_prop6_two_regions():
    f = VNNCOMP / "acasxu" / "vnnlib" / "prop_6.vnnlib"
    if not f.is_file():
        pytest.skip(f"missing {f}")
    spec = read_vnnlib(f)
    assert spec.n_inputs == 5 and spec.n_outputs == 5
    assert len(spec.regions) == 2
    a, b = spec.regions
    # The two boxes differ only in X_1 (positive / negative heading).
    np.testing.assert_array_equal(a.lower[[0, 2, 3, 4]], b.lower[[0, 2, 3, 4]])
    np.testing.assert_allclose([a.lower[1], a.upper[1]], [0.11140846, 0.499999896])
    np.testing.assert_allclose([b.lower[1], b.upper[1]], [-0.499999896, -0.11140846])
    for r in spec.regions:
        # "unsafe if COC is not minimal": Y_j <= Y_0 for some j in 1..4, i.e. -y0 + yj <= 0
        assert len(r.disjuncts) == 4
        for j, oc in enumerate(r.disjuncts, start=1):
            want = np.zeros((1, 5))
            want[0, 0], want[0, j] = -1.0, 1.0
            np.testing.assert_array_equal(oc.C, want)
            np.testing.assert_array_equal(oc.d, [0.0])
        # semantics: y with COC (index 0) largest violates; y with COC smallest does not
        assert any(oc.holds([5, 1, 2, 3, 4]) for oc in r.disjuncts)
        assert not any(oc.holds([0, 1, 2, 3, 4]) for oc in r.disjuncts)


def test_real_mnist_fc_or_over_outputs():
    files = sorted((VNNCOMP / "mnist_fc" / "vnnlib").glob("*.vnnlib"))
    if not files:
        pytest.skip("no mnist_fc files")
    spec = read_vnnlib(files[0])
    assert spec.n_inputs == 784 and spec.n_outputs == 10
    (r,) = spec.regions
    assert len(r.disjuncts) == 9
    assert all(oc.C.shape == (1, 10) for oc in r.disjuncts)
    assert np.all(r.lower >= 0.0) and np.all(r.upper <= 1.0)


def test_real_largest_file_is_fast():
    _need_real()
    largest = max(_real_files(), key=lambda p: p.stat().st_size)
    read_vnnlib(largest)  # warm up imports and caches
    elapsed = float("inf")
    for _ in range(3):  # best of 3, so that a busy machine does not fail the test
        t0 = time.perf_counter()
        spec = read_vnnlib(largest)
        elapsed = min(elapsed, time.perf_counter() - t0)
    assert spec.n_inputs > 0
    assert elapsed < 0.5, f"{largest} took {elapsed:.3f} s"


def test_error_unbounded_input_common_part_points_at_declaration(tmp_path):
    """X_1 lacks an upper bound everywhere: the error points at its declaration, not at the
    output disjunct the term came from."""
    text = DECL_2_2 + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n" \
                      "(assert (or (<= Y_0 0)\n (<= Y_1 0)))\n"
    expect_error(tmp_path, text, 2, "unbounded input X_1 (no upper bound)")


def test_utf8_bom_and_bad_bytes(tmp_path):
    text = DECL_2_2 + BOX_2 + "(assert (<= Y_0 0))\n"
    p = tmp_path / "bom.vnnlib"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_vnnlib(p).n_inputs == 2
    p = tmp_path / "bytes.vnnlib"
    p.write_bytes(text.encode() + b"; \xff\xfe\n")
    with pytest.raises(VnnlibError, match=r"bytes\.vnnlib:10: .*UTF-8"):
        read_vnnlib(p)


def test_error_is_picklable():
    import pickle

    with pytest.raises(VnnlibError) as info:
        parse_vnnlib("(declare-const X_0 Real))", name="p.vnnlib")
    e = pickle.loads(pickle.dumps(info.value))
    assert str(e) == str(info.value) and (e.name, e.line) == ("p.vnnlib", 1)
