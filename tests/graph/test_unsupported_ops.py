"""The whole graph is checked before bounding: one UnsupportedOpsError lists EVERY unsupported
node (name, op, shape) at once, from torch.fx models and from ONNX files."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper

from verifier import BoundedModel, UnsupportedOpsError


class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("c", torch.ones(4))

    def forward(self, x):
        h = self.l1(x)
        e = torch.floor(h)                      # no rule
        s = torch.sort(h, dim=1)[0]             # sort (+ getitem of its tuple)
        d = h ** self.l2(x)                     # a perturbed exponent
        sm = F.selu(h)                          # selu (no rule)
        r = 2.0 ** h                            # a constant to a perturbed power
        a = torch.sign(h)                       # sign
        p, q = h.chunk(2, dim=1)                # several outputs that vary with the input
        m = (h > 0).float()                     # a comparison: a mask that varies with x
        i = h.argmax(1, keepdim=True)           # an integer result
        return e + s + d + sm + r + a + torch.cat([p, q], 1) + h * m + i


def test_every_unsupported_node_is_listed_at_once():
    with pytest.raises(UnsupportedOpsError) as info:
        BoundedModel(ManyUnsupported(), input_shape=(4,))
    err = info.value
    names = [n for n, _ in err.problems]
    msg = str(err)
    for expected in ("floor", "sort", "pow", "selu", "sign", "chunk", "gt", "argmax"):
        assert any(n.startswith(expected) for n in names), f"{expected} missing from {names}"
        assert expected in msg
    pow_nodes = [n for n in names if "pow" in n]
    assert len(pow_nodes) >= 2                   # both powers with a perturbed exponent
    for name in names:
        assert name in msg
    assert f"{len(err.problems)} unsupported operation(s)" in msg
    # each problem names what is wrong and the shape
    assert all("shape" in what for _, what in err.problems)
    assert sum("perturbed exponent" in what for _, what in err.problems) == 2


def test_input_dependent_non_float_values_are_never_folded_into_constants():
    """sort / chunk / comparisons / argmax of a perturbed tensor are not constants: folding them
    (their values at the example input) into the graph would give unsound bounds."""
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 4)

        def forward(self, x):
            h = self.l(x)
            return h + torch.sort(h, dim=1)[0]

    with pytest.raises(UnsupportedOpsError) as info:
        BoundedModel(Folded(), input_shape=(3,))
    assert [n for n, _ in info.value.problems] == ["sort"]      # its getitem is not re-reported


def test_shape_only_values_stay_constants():
    """x.size(), x.shape and ops on them do not depend on the input's values."""
    class ShapeUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 2)

        def forward(self, x):                     # x: [B, 2, 3]
            return self.l(x.view(x.size(0), x.shape[1] * x.shape[2]))

    bm = BoundedModel(ShapeUse(), input_shape=(2, 3))
    assert [bm.graph[n].op for n in bm.graph.order] == ["input", "select", "linear"]


def test_supported_parts_are_not_reported():
    with pytest.raises(UnsupportedOpsError) as info:
        BoundedModel(ManyUnsupported(), input_shape=(4,))
    names = [n for n, _ in info.value.problems]
    assert not any(n.startswith(("l1", "l2", "add")) for n in names)


def test_unsupported_ops_in_onnx_graph_all_listed(tmp_path):
    """Ops the ONNX reader reads but we cannot bound (Floor, Selu, Sign) are all reported."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("Floor", ["input"], ["e"], name="my_floor"),
        helper.make_node("Selu", ["e"], ["s"], name="my_selu"),
        helper.make_node("Sign", ["input"], ["a"], name="my_sign"),
        helper.make_node("Add", ["s", "a"], ["out"], name="my_add"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpsError) as info:
        BoundedModel.from_onnx(path)
    msg = str(info.value)
    assert len(info.value.problems) == 3
    for what in ("floor", "selu", "sign"):
        assert what in msg.lower()


def test_onnx_ops_without_converter_all_listed(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("FancyOpA", ["input"], ["a"], name="fancy_a", domain="my.domain"),
        helper.make_node("FancyOpB", ["a"], ["out"], name="fancy_b", domain="my.domain"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13),
                                             helper.make_opsetid("my.domain", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpsError) as info:
        BoundedModel.from_onnx(path)
    names = [n for n, _ in info.value.problems]
    assert names == ["fancy_a", "fancy_b"]
