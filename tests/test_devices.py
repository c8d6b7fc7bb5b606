"""The ``device`` argument: every tensor the engine creates names its device, so a model wrapped
with ``device="cpu"`` keeps everything on the CPU even where torch's default device is another
one (``with torch.device("meta")``: a tensor made on the default device is a meta tensor, and
mixing it with a CPU tensor raises, so a hard-coded or default-device tensor fails the test);
``--device cuda`` without a GPU is an exit-2 error before any work.

The rule is also checked on the source: a scan of ``verifier/`` for tensor factory calls
(``torch.zeros``, ``torch.as_tensor``, ``torch.rand``, ``torch.Generator``, ...) without a
``device=`` argument (like ``tests/test_dependencies.py`` scans the imports).
"""
from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel, LpBall, margin_spec
from verifier.cli import main
from verifier.complete import verify
from verifier.devices import as_tensor, check_same_device, resolve_device
from verifier.errors import DeviceError
from verifier.perturbation import Box
from verifier.spec.vnnlib import read_vnnlib

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
CPU = torch.device("cpu")

# torch functions that make a tensor (or a generator) on the default device unless told
FACTORIES = {"zeros", "ones", "full", "empty", "eye", "arange", "range", "linspace", "logspace",
             "tensor", "as_tensor", "asarray", "scalar_tensor", "empty_strided", "rand", "randn",
             "randint", "randperm", "normal", "bernoulli_", "tril_indices", "triu_indices",
             "sparse_coo_tensor", "Generator"}


def factory_calls_without_device(source: str, name: str = "<source>") -> list[str]:
    """``file:line: torch.f`` for every ``torch.f(...)`` call of a factory without ``device=``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            out.append(f"{name}:{node.lineno}: torch.{node.func.attr}")
    return out


# -- the source rule -----------------------------------------------------------------------------

def test_the_scan_sees_factory_calls():
    """Guards the test below against scanning nothing."""
    src = ("import torch\na = torch.zeros(3)\nb = torch.zeros(3, device=x.device)\n"
           "g = torch.Generator()\nc = torch.as_tensor(v, dtype=d)\nd = x.new_zeros(3)\n")
    assert factory_calls_without_device(src) == [
        "<source>:2: torch.zeros", "<source>:4: torch.Generator", "<source>:5: torch.as_tensor"]


def test_no_tensor_is_created_without_an_explicit_device():
    bad = []
    for path in sorted((ROOT / "verifier").rglob("*.py")):
        bad += factory_calls_without_device(path.read_text(encoding="utf-8"),
                                            str(path.relative_to(ROOT)))
    assert not bad, ("tensor factories without device= (derive it from a tensor at hand, "
                     "x.new_zeros / zeros_like, or verifier.devices.as_tensor):\n  "
                     + "\n  ".join(bad))


def test_the_meta_context_catches_a_default_device_tensor():
    """What the tests below rely on: under ``torch.device("meta")`` a tensor made without a
    device (even from a CPU tensor) is a meta tensor, which holds no values and does not mix
    with CPU tensors (torch raises; not done here: building that error takes seconds)."""
    x = torch.ones(3)
    with torch.device("meta"):
        made = [torch.zeros(3), torch.as_tensor(x), torch.tensor([1.0]), torch.arange(2)]
        kept = [torch.zeros(3, device="cpu"), x.new_zeros(3), torch.zeros_like(x)]
    assert all(t.is_meta for t in made) and all(t.device == CPU for t in kept)


# -- resolving devices ---------------------------------------------------------------------------

def test_resolve_device_names():
    assert resolve_device(None) == CPU and resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    assert resolve_device("auto") == (torch.device("cuda", 0) if HAS_GPU else CPU)
    for bad in ("gpu", "cuda:x", "cuda:-1", "tpu", ""):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(bad)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
        resolve_device(name)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        BoundedModel(nn.Linear(2, 2), input_shape=(2,), device=name)


def test_as_tensor_keeps_a_tensor_where_it_is_and_places_other_data():
    t = torch.ones(2, dtype=torch.float64)
    assert as_tensor(t) is t
    with torch.device("meta"):
        assert as_tensor(t).device == CPU
        assert as_tensor([1.0, 2.0]).device == CPU
        assert as_tensor(np.zeros(2), torch.float32, "cpu").dtype == torch.float32


def test_a_model_on_another_device_than_asked_is_an_error():
    bm = BoundedModel(nn.Linear(2, 2), input_shape=(2,), device="cpu")
    check_same_device(bm.device, None, "the model")
    check_same_device(bm.device, "cpu", "the model")
    with pytest.raises(DeviceError, match="lives on meta"):
        check_same_device(torch.device("meta"), "cpu", "the model")


# -- bounds, verify and a training step under another default device -----------------------------

def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10),
                         nn.Tanh(), nn.Linear(10, 3))


def _all_on_cpu(res):
    tensors = [res.lower, res.upper] + [t for iv in res.nodes.values()
                                        for t in (iv.lower, iv.upper)]
    return all(t.device == CPU for t in tensors)


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "alpha-crown"])
def test_bounds_with_an_explicit_cpu_device_under_a_meta_default(method):
    net = _cnn()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = net(x).argmax(1)
    with torch.device("meta"):
        bm = BoundedModel(net, input_shape=(1, 6, 6), device="cpu")
        ball = LpBall(x, 0.03, clip=(0.0, 1.0))
        res = bm.bounds(ball, method, spec=margin_spec(y, 3, device="cpu"))
    assert bm.device == CPU and _all_on_cpu(res)
    # the same numbers as without the context, and true for points of the ball
    ref = BoundedModel(net, input_shape=(1, 6, 6)).bounds(ball, method, spec=margin_spec(y, 3))
    torch.testing.assert_close(res.lower, ref.lower)
    pts = ball.sample(256, torch.Generator().manual_seed(2)).reshape(-1, 1, 6, 6)
    with torch.no_grad():
        out = net(pts).reshape(256, 2, 3)
    margins = torch.einsum("bsk,nbk->nbs", margin_spec(y, 3), out)
    assert bool((margins >= res.lower - 1e-5).all())


def test_weight_perturbation_bounds_under_a_meta_default():
    from verifier.weights import WeightPerturbation
    net = _cnn()
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.device("meta"):
        bm = BoundedModel(net, input_shape=(1, 6, 6), device="cpu")
        res = bm.bounds(x, "crown", weights=WeightPerturbation("*.weight", 0.01, relative=True))
    assert _all_on_cpu(res)
    with torch.no_grad():
        y = net(x)
    assert bool((res.lower <= y + 1e-5).all() and (res.upper >= y - 1e-5).all())


def _vnnlib(lo, hi, d):
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lo))] + ["(declare-const Y_0 Real)"]
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        lines += [f"(assert (>= X_{i} {a!r}))", f"(assert (<= X_{i} {b!r}))"]
    lines.append(f"(assert (<= Y_0 {d!r}))")
    return "\n".join(lines) + "\n"


def _mlp(n_in, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def _sampled_min(net, lo, hi, n=100_000):
    x = lo + torch.rand(n, lo.numel(), generator=torch.Generator().manual_seed(0)) * (hi - lo)
    with torch.no_grad():
        y = net(x)
    return float(y.min())


def _alpha_min(net, lo, hi):
    bm = BoundedModel(net, input_shape=(lo.numel(),))
    return float(bm.bounds(Box(lo[None], hi[None]), "alpha-crown",
                           spec=torch.tensor([[[1.0]]])).lower)


@pytest.mark.parametrize("n_in,seed,split", [(3, 1, "bab-input"), (20, 2, "bab-relu")])
def test_verify_with_branch_and_bound_under_a_meta_default(tmp_path, n_in, seed, split):
    """Input splits (3 inputs) and ReLU splits (20, beta-CROWN): ``unsat`` halfway between
    alpha-CROWN's bound and the sampled minimum (splitting needed; no sampled point violates
    it), and a ``sat`` whose counterexample, replayed here on the network, violates."""
    net = _mlp(n_in, seed)
    lo, hi = -0.5 * torch.ones(n_in), 0.5 * torch.ones(n_in)
    m, a = _sampled_min(net, lo, hi), _alpha_min(net, lo, hi)
    assert a < m - 0.02            # alpha-CROWN alone cannot prove what is asked below
    d_unsat = a + 0.5 * (m - a)    # below the sampled minimum: provable by splitting
    d_sat = m + 0.05               # a sampled point violates it
    verdicts = {}
    for name, d in (("unsat", d_unsat), ("sat", d_sat)):
        p = tmp_path / f"{name}.vnnlib"
        p.write_text(_vnnlib(lo, hi, d))
        spec = read_vnnlib(p)
        with torch.device("meta"):
            bm = BoundedModel(net, input_shape=(n_in,), device="cpu")
            verdicts[name] = v = verify(bm, spec, timeout=20, methods=("ibp", "crown"),
                                        attack=False, device="cpu")
        assert v.method == split, v
        if name == "sat":
            assert v.status == "sat", v
            x = torch.tensor(v.counterexample.x, dtype=torch.float32)
            with torch.no_grad():
                y = net(x[None])[0]
            assert float(y[0]) <= d and bool(((x >= lo) & (x <= hi)).all())
        else:
            assert v.status == "unsat" and v.details["domains"] > 1, v


def test_a_training_step_under_a_meta_default(tmp_path):
    from verifier.train import from_dict, load_digits_split
    from verifier.train.trainer import _new_state, train_step
    ds = load_digits_split("train")
    cfg = from_dict({"dataset": "digits", "model": "mlp", "method": "crown-ibp",
                     "model_kwargs": {"in_dim": 64, "hidden": [16]}, "eps": 0.05,
                     "epochs": 2, "warmup_epochs": 0, "ramp_epochs": 1, "pgd_weight": 0.5,
                     "pgd_steps": 2, "device": "cpu", "output": str(tmp_path / "run")})
    state = _new_state(cfg, ds)
    s = {"eps": 0.05, "kappa": 0.5, "beta": 0.5, "progress": 0.5}
    xb, yb = ds.x[:16], ds.y[:16]
    # the first step outside: torch.optim.Adam makes its step counters on the default device
    train_step(cfg, state, xb, yb, s, ds.n_classes, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in state.net.parameters()]
    with torch.device("meta"):
        out = train_step(cfg, state, xb, yb, s, ds.n_classes, torch.Generator().manual_seed(1))
    assert math.isfinite(out["loss"]) and {"rob", "adv"} <= set(out)
    after = list(state.net.parameters())
    assert all(p.device == CPU for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# -- configs and the command line ----------------------------------------------------------------

def test_configs_check_the_device_name():
    from verifier.lipschitz.train import LipschitzConfig
    from verifier.train import from_dict
    from verifier.train.config import ConfigError
    assert from_dict({"device": "AUTO"}).device == "auto"
    with pytest.raises(ConfigError, match="'device'.*unknown device 'gpu'"):
        from_dict({"device": "gpu"})
    assert LipschitzConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match="'device'"):
        LipschitzConfig(device="cuda1")


def test_ray_gpu_share_is_checked_before_ray_starts():
    from verifier.schedule import SchedulerError
    from verifier.schedule.ray_batch import check_gpu_share
    check_gpu_share("cuda", 0.5)
    check_gpu_share("cpu", 0.0)
    with pytest.raises(SchedulerError, match="needs --gpus-per-worker"):
        check_gpu_share("cuda:0", 0.0)
    with pytest.raises(SchedulerError, match="whole number"):
        check_gpu_share("cuda", 1.5)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
@pytest.mark.parametrize("command", [
    ["bounds", "MISSING.onnx", "--input", "x.npy", "--eps", "0.1"],
    ["verify", "MISSING.onnx", "p.vnnlib"],
    ["batch", "MISSING.csv", "--out", "r.csv"],
    ["flatness", "MISSING.onnx", "--data", "d.npz", "--weights", "*", "--weight-eps", "0.1"],
    ["lipschitz", "MISSING.onnx"],
    ["train", "--epochs", "1", "--output", "OUT"],
])
def test_cli_device_cuda_without_a_gpu_exits_2_before_any_work(capsys, tmp_path, monkeypatch,
                                                                 command):
    """Checked when the flags are read: the error names the device, not the missing files,
    and nothing is written."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *command, "--device", "cuda")
    assert code == 2 and out == ""
    assert err.startswith("error: device cuda: no CUDA GPU is visible"), err
    assert "MISSING" not in err and not any(tmp_path.iterdir())


def test_cli_rejects_an_unknown_device_name(capsys):
    code, out, err = _run(capsys, "bounds", "m.onnx", "--device", "gpu")
    assert code == 2 and "unknown device 'gpu'" in err


def test_cli_bounds_on_device_auto_matches_cpu(capsys, tmp_path):
    net = _mlp(3, seed=2)
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.zeros(1, 3), str(path), dynamo=False)
    np.save(tmp_path / "x.npy", np.full((1, 3), 0.2, np.float32))
    common = ["bounds", path, "--input", tmp_path / "x.npy", "--eps", "0.1", "--json"]
    runs = [_run(capsys, *common, "--device", dev) for dev in ("cpu", "auto")]
    assert [r[0] for r in runs] == [0, 0]
    import json
    a, b = (json.loads(r[1]) for r in runs)
    assert np.allclose(a["lower"], b["lower"], atol=1e-5)
    assert np.allclose(a["upper"], b["upper"], atol=1e-5)


def test_verify_of_a_path_loads_on_the_device(tmp_path):
    net = _mlp(3, seed=3)
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.zeros(1, 3), str(path), dynamo=False)
    lo, hi = -0.5 * torch.ones(3), 0.5 * torch.ones(3)
    p = tmp_path / "p.vnnlib"
    p.write_text(_vnnlib(lo, hi, _sampled_min(net, lo, hi) + 0.05))
    t0 = time.perf_counter()
    with torch.device("meta"):
        v = verify(str(path), str(p), timeout=20, device="cpu")
    assert v.status == "sat" and v.counterexample.replayed_by == "onnxruntime"
    assert time.perf_counter() - t0 < 20
