"""`verifier bounds` on bad input: every mistake is one `error: ...` line naming the problem on
stderr, exit status 2, nothing on stdout and never a traceback."""
from __future__ import annotations

import numpy as np
import pytest

from cli_support import make_mlp, make_unsupported


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad-input corpus, built once."""
    d = tmp_path_factory.mktemp("bad")
    good = make_mlp(d / "good.onnx")
    data = good.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (d / "garbage.onnx").write_bytes(b"\x00\xffnot an onnx file at all")
    make_unsupported(d / "unsupported.onnx")
    x = np.full((1, 1, 2, 2), 0.5, np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "wrong_shape.npy", np.zeros((3, 5), np.float32))
    xn = x.copy()
    xn[0, 0, 1, 0] = np.nan
    np.save(d / "nan.npy", xn)
    np.save(d / "lo_gt.npy", x + 0.1)
    np.save(d / "hi.npy", x)
    np.save(d / "hi_other_batch.npy", np.repeat(x, 2, axis=0))
    np.save(d / "label_3.npy", np.array([3]))
    np.save(d / "label_half.npy", np.array([0.5]))
    np.save(d / "label_str.npy", np.array(["seven"]))
    np.save(d / "label_two.npy", np.array([0, 1]))
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "not_npy.npy").write_bytes(b"hello")
    return d


def _p(d, s):
    return str(d / s) if s.endswith((".npy", ".onnx")) else s


GOOD = ["good.onnx", "--input", "x.npy", "--eps", "0.1"]

# (argv after `bounds`, substrings the one error line must contain)
CASES = {
    "missing_model": (["absent.onnx", "--input", "x.npy", "--eps", "0.1"], ["absent.onnx", "no such file"]),
    "missing_input": (["good.onnx", "--input", "absent.npy", "--eps", "0.1"], ["absent.npy", "no such file"]),
    "truncated_onnx": (["truncated.onnx", "--input", "x.npy", "--eps", "0.1"], ["truncated.onnx", "not a readable ONNX"]),
    "garbage_onnx": (["garbage.onnx", "--input", "x.npy", "--eps", "0.1"], ["garbage.onnx", "ONNX"]),
    "wrong_shape": (["good.onnx", "--input", "wrong_shape.npy", "--eps", "0.1"], ["wrong_shape.npy", "[3, 5]", "[1, 2, 2]"]),
    "eps_negative": (GOOD[:-1] + ["-1"], ["--eps", ">= 0"]),
    "eps_not_a_number": (GOOD[:-1] + ["abc"], ["--eps", "not a number"]),
    "lower_gt_upper": (["good.onnx", "--lower", "lo_gt.npy", "--upper", "hi.npy"], ["lo_gt.npy", ">", "hi.npy"]),
    "box_batch_mismatch": (["good.onnx", "--lower", "x.npy", "--upper", "hi_other_batch.npy"], ["differ in shape"]),
    "nan_input": (["good.onnx", "--input", "nan.npy", "--eps", "0.1"], ["nan.npy", "NaN"]),
    "nan_lower": (["good.onnx", "--lower", "nan.npy", "--upper", "hi.npy"], ["nan.npy", "NaN"]),
    "label_out_of_range_int": (GOOD + ["--label", "12"], ["label 12", "out of range", "3 outputs"]),
    "label_negative": (GOOD + ["--label", "-1"], ["label -1", "out of range"]),
    "label_out_of_range_file": (GOOD + ["--label", "label_3.npy"], ["label_3.npy", "label 3", "out of range"]),
    "label_non_integer": (GOOD + ["--label", "label_half.npy"], ["label_half.npy", "integers", "0.5"]),
    "label_strings": (GOOD + ["--label", "label_str.npy"], ["label_str.npy", "dtype"]),
    "label_count": (GOOD + ["--label", "label_two.npy"], ["2 labels for 1 sample ("]),
    "label_missing": (GOOD + ["--label", "absent_labels.npy"], ["absent_labels.npy", "no such file"]),
    "pickled_npy": (["good.onnx", "--input", "obj.npy", "--eps", "0.1"], ["obj.npy", "not a readable .npy"]),
    "not_npy": (["good.onnx", "--input", "not_npy.npy", "--eps", "0.1"], ["not_npy.npy", "not a readable .npy"]),
    "ball_and_box": (GOOD + ["--lower", "x.npy", "--upper", "x.npy"], ["exclude each other"]),
    "no_input_set": (["good.onnx"], ["no input set"]),
    "eps_without_input": (["good.onnx", "--eps", "0.1"], ["--eps needs --input"]),
    "input_without_eps": (["good.onnx", "--input", "x.npy"], ["--input needs --eps"]),
    "norm_with_box": (["good.onnx", "--lower", "x.npy", "--upper", "x.npy", "--norm", "2"], ["--norm", "exclude"]),
    "lower_without_upper": (["good.onnx", "--lower", "x.npy"], ["--lower and --upper"]),
    "clip_empty": (GOOD + ["--clip", "1", "0"], ["--clip", "LO > HI"]),
    "bad_norm": (GOOD + ["--norm", "3"], ["--norm", "invalid choice"]),
    "bad_method": (GOOD + ["--method", "alpha"], ["--method", "invalid choice"]),
    "threads_zero": (GOOD + ["--threads", "0"], ["--threads", ">= 1"]),
    "unknown_flag": (GOOD + ["--frobnicate"], ["unrecognized arguments", "--frobnicate"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_error_line(cli, bad, name):
    argv, needles = CASES[name]
    r = cli("bounds", *[_p(bad, a) for a in argv])
    assert r.code == 2, (r.code, r.err)
    assert r.out == ""
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_unsupported_ops_are_all_listed(cli, bad):
    r = cli("bounds", bad / "unsupported.onnx", "--input", bad / "x.npy", "--eps", 0.1)
    assert r.code == 2 and r.out == "" and "Traceback" not in r.err
    assert r.err.startswith("error: 2 unsupported operation(s)")
    assert "the_floor" in r.err and "the_selu" in r.err
    assert len(r.err.strip().splitlines()) == 3         # the headline and one line per node


def test_internal_error_exits_1_with_traceback_only_under_debug(cli, tiny, monkeypatch):
    from verifier.api import BoundedModel

    def boom(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(BoundedModel, "bounds", boom)
    args = ["bounds", tiny["model"], "--input", tiny["x1"], "--eps", 0.1]
    r = cli(*args)
    assert r.code == 1 and r.out == ""
    assert r.err.startswith("internal error: RuntimeError: kaboom")
    assert "Traceback" not in r.err and "--debug" in r.err
    r = cli(*args, "--debug")
    assert r.code == 1 and "Traceback" in r.err and "kaboom" in r.err
