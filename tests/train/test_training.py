"""Certified training on scikit-learn's digits: IBP training certifies far more than natural
training at the same eps; a run interrupted inside an epoch and resumed ends with exactly the
weights of an uninterrupted run; the schedule's shape."""
from __future__ import annotations

import pytest
import torch

from verifier import BoundedModel, LpBall, margin_spec
from verifier.train import from_dict, load_digits_split
from verifier.train.config import ConfigError
from verifier.train.schedule import Schedule
from verifier.train.trainer import train

EPS = 0.1
BASE = dict(dataset="digits", model="mlp", model_kwargs={"in_dim": 64, "hidden": [64, 64]},
            eps=EPS, epochs=20, warmup_epochs=1, ramp_epochs=10, batch_size=64, lr=1e-3, seed=0)


def _certified_acc(net, ds, eps, method="ibp"):
    bm = BoundedModel(net.eval(), input_shape=ds.input_shape)
    res = bm.bounds(LpBall(ds.x, eps, clip=(0, 1)), method, spec=margin_spec(ds.y, 10))
    return float(res.verified.float().mean())


def _clean_acc(net, ds):
    with torch.no_grad():
        return float((net.eval()(ds.x).argmax(1) == ds.y).float().mean())


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("train"), load_digits_split("test")


def test_ibp_training_certifies_far_more_than_natural_training(tmp_path, digits):
    nat = train(from_dict({**BASE, "method": "natural", "output": str(tmp_path / "nat")}),
                progress=False, data=digits).net
    ibp = train(from_dict({**BASE, "method": "ibp", "output": str(tmp_path / "ibp")}),
                progress=False, data=digits).net
    test = digits[1]
    nat_clean, ibp_clean = _clean_acc(nat, test), _clean_acc(ibp, test)
    nat_cert, ibp_cert = _certified_acc(nat, test, EPS), _certified_acc(ibp, test, EPS)
    assert nat_clean > 0.9            # the natural model did learn the task
    assert ibp_clean > 0.6
    assert nat_cert < 0.05            # ... but certifies almost nothing at this eps
    assert ibp_cert > nat_cert + 0.3, (nat_cert, ibp_cert)
    # the certificates hold: no certified test sample is misclassified
    bm = BoundedModel(ibp, input_shape=test.input_shape)
    v = bm.bounds(LpBall(test.x, EPS, clip=(0, 1)), "ibp", spec=margin_spec(test.y, 10)).verified
    with torch.no_grad():
        assert (ibp(test.x[v]).argmax(1) == test.y[v]).all()


def test_crown_ibp_training_runs_and_certifies(tmp_path, digits):
    cfg = from_dict({**BASE, "method": "crown-ibp", "epochs": 10, "ramp_epochs": 5,
                     "output": str(tmp_path / "c")})
    net = train(cfg, progress=False, data=digits).net
    cert = _certified_acc(net, digits[1], EPS, "crown-ibp")
    print("crown-ibp certified", cert)
    assert cert > 0.2          # a naturally trained model certifies < 0.05 (test above)


class _Stop(Exception):
    pass


def test_resume_after_an_interrupted_epoch_gives_identical_weights(tmp_path, digits):
    d = {**BASE, "epochs": 5, "ramp_epochs": 3, "pgd_weight": 0.5, "pgd_steps": 2,
         "model": "cnn_cert", "model_kwargs": {"input_size": 8, "width": 4, "fc": 16, "bn": True},
         "ibp_init": True}
    full = train(from_dict({**d, "output": str(tmp_path / "full")}), progress=False, data=digits)

    def interrupt(epoch, step):
        if epoch == 2 and step == 7:
            raise _Stop
    cfg = from_dict({**d, "output": str(tmp_path / "cut")})
    with pytest.raises(_Stop):
        train(cfg, progress=False, data=digits, callback=interrupt)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2         # epochs 0 and 1 were saved, epoch 2 was cut short
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False, data=digits)
    resumed = train(cfg, resume=True, progress=False, data=digits)
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_a_different_config(tmp_path, digits):
    d = {**BASE, "epochs": 2, "ramp_epochs": 1, "output": str(tmp_path / "r")}
    train(from_dict(d), progress=False, data=digits)
    with pytest.raises(ConfigError, match="different config.*eps"):
        train(from_dict({**d, "eps": 0.2}), resume=True, progress=False, data=digits)


def test_schedule_warmup_then_smooth_ramp_then_hold():
    s = Schedule(eps=0.3, warmup_epochs=2, ramp_epochs=4, steps_per_epoch=10, shape="smooth",
                 kappa=(1.0, 0.5), beta=(1.0, 0.0))
    pts = [s.at(e, k) for e in range(8) for k in range(10)]
    eps = [p["eps"] for p in pts]
    assert all(e == 0 for e in eps[:20])
    assert all(b >= a for a, b in zip(eps, eps[1:]))                 # never decreases
    assert eps[59] == pytest.approx(0.3) and eps[-1] == pytest.approx(0.3)
    ramp = eps[20:60]
    assert ramp[0] < 0.3 / 40 and (ramp[-1] - ramp[-2]) < 0.3 / 40    # slow start, slow end
    mid = s.at(4, 0)                                                  # halfway through the ramp
    assert mid["kappa"] == pytest.approx(1.0 - 0.5 * mid["progress"])
    assert mid["beta"] == pytest.approx(1.0 - mid["progress"])
    lin = Schedule(0.3, 0, 4, 10, shape="linear")
    assert lin.at(1, 9)["eps"] == pytest.approx(0.15)


def test_flatness_training_certifies_more_models_than_plain_training(tmp_path, digits):
    """Training under a relative weight perturbation (fixed inputs) certifies more test samples
    for every model in the set than natural training does."""
    from verifier.train.evaluation import certified_under_weights
    from verifier.weights import WeightPerturbation
    d = {**BASE, "eps": 0.0, "epochs": 10, "ramp_epochs": 5}
    nat = train(from_dict({**d, "method": "natural", "output": str(tmp_path / "n")}),
                progress=False, data=digits).net
    flat = train(from_dict({**d, "method": "ibp", "weight_eps": 0.05, "output": str(tmp_path / "f")}),
                 progress=False, data=digits).net
    w = WeightPerturbation("*", 0.05, relative=True)
    a = certified_under_weights(nat, digits[1], 0.0, w, methods=("ibp",))["ibp"]
    b = certified_under_weights(flat, digits[1], 0.0, w, methods=("ibp",))["ibp"]
    print("certified under weights: natural", a, "flatness-trained", b)
    assert b > a + 0.2
