"""ema_decay: the trained model is an exponential moving average of the weights over the steps;
the last weights are kept beside it, resume restores the average, bad values are refused."""
from __future__ import annotations

import json

import pytest
import torch

from verifier.train import TrainConfig, from_dict, load_digits_split
from verifier.train import trainer as trainer_mod
from verifier.train.config import ConfigError
from verifier.train.run import run_training
from verifier.train.trainer import train

BASE = dict(dataset="digits", model="cnn_cert",
            model_kwargs={"input_size": 8, "width": 4, "fc": 16, "bn": True}, ibp_init=True,
            method="ibp", eps=0.1, epochs=3, warmup_epochs=1, ramp_epochs=1, batch_size=128,
            lr=2e-3, seed=0, eval_methods=["ibp"], eval_eps=[])


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("train"), load_digits_split("test")


def _expected_average(states: list[dict], decay: float) -> dict:
    """The average written out: start at states[0] (the initial weights); after step n
    (states[n]) avg = r avg + (1 - r) w with r = min(decay, (1 + n) / (10 + n)); integer
    entries are the last ones."""
    avg = {k: v.double().clone() if v.is_floating_point() else v.clone() for k, v in states[0].items()}
    for n, w in enumerate(states[1:], start=1):
        r = min(decay, (1 + n) / (10 + n))
        for k, v in w.items():
            avg[k] = r * avg[k] + (1 - r) * v.double() if v.is_floating_point() else v.clone()
    return avg


def test_the_model_is_the_moving_average_of_the_weights_after_each_step(tmp_path, digits, monkeypatch):
    seen: list[dict] = []
    step = trainer_mod.train_step

    def recording(cfg, state, *a, **k):
        if not seen:
            seen.append({n: v.detach().clone() for n, v in state.net.state_dict().items()})
        out = step(cfg, state, *a, **k)
        seen.append({n: v.detach().clone() for n, v in state.net.state_dict().items()})
        return out
    monkeypatch.setattr(trainer_mod, "train_step", recording)
    decay = 0.9
    got = train(from_dict({**BASE, "ema_decay": decay, "output": str(tmp_path / "e")}),
                progress=False, data=digits)
    assert len(seen) == 1 + 3 * (len(digits[0]) // 128)
    want = _expected_average(seen, decay)
    avg = got.net.state_dict()
    for k, v in avg.items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), want[k], rtol=1e-5, atol=1e-6), k
        else:
            assert torch.equal(v, want[k]), k
    # the last weights are kept, and they differ from the average
    assert all(torch.equal(got.raw[k], seen[-1][k]) for k in avg)
    assert any(not torch.allclose(avg[k], seen[-1][k]) for k in avg if avg[k].is_floating_point())

    # averaging does not change the training itself: the last weights are a plain run's
    monkeypatch.setattr(trainer_mod, "train_step", step)
    plain = train(from_dict({**BASE, "output": str(tmp_path / "p")}), progress=False, data=digits)
    assert plain.raw is None
    assert all(torch.equal(plain.net.state_dict()[k], got.raw[k]) for k in avg)


class _Stop(Exception):
    pass


def test_resume_restores_the_average(tmp_path, digits):
    d = {**BASE, "ema_decay": 0.95}
    full = train(from_dict({**d, "output": str(tmp_path / "full")}), progress=False, data=digits)

    def interrupt(epoch, step):
        if epoch == 1 and step == 3:
            raise _Stop
    cfg = from_dict({**d, "output": str(tmp_path / "cut")})
    with pytest.raises(_Stop):
        train(cfg, progress=False, data=digits, callback=interrupt)
    assert "ema" in torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    resumed = train(cfg, resume=True, progress=False, data=digits)
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
        assert torch.equal(full.raw[k], resumed.raw[k]), k
    # a checkpoint of a run without the average cannot continue as one with it
    plain = from_dict({**BASE, "output": str(tmp_path / "plain")})
    train(plain, progress=False, data=digits)
    with pytest.raises(ConfigError, match="different config.*ema_decay"):
        train(from_dict({**BASE, "ema_decay": 0.9, "output": str(tmp_path / "plain")}),
              resume=True, progress=False, data=digits)


def test_the_run_ships_the_average_and_keeps_the_last_weights(tmp_path, digits, monkeypatch):
    cfg = from_dict({**BASE, "ema_decay": 0.9, "epochs": 2, "output": str(tmp_path / "r")})
    import verifier.train.run as run_mod
    monkeypatch.setattr(run_mod, "load_data", lambda c: digits)
    report = run_training(cfg, progress=False)
    out = tmp_path / "r"
    shipped = torch.load(out / "model.pt", weights_only=True)
    last = torch.load(out / "model_last.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in shipped.items():
        assert torch.equal(v, ckpt["ema"][k]) and torch.equal(last[k], ckpt["model"][k]), k
    assert "moving average" in report["weights"] and "model_last.pt" in report["weights"]
    assert json.loads((out / "report.json").read_text())["weights"] == report["weights"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_decays_are_refused(bad):
    with pytest.raises(ConfigError, match="'ema_decay': must lie in \\[0, 1\\)"):
        TrainConfig(ema_decay=bad)


def test_the_cli_flag_sets_the_key(tmp_path, capsys):
    from verifier.cli.main import build_parser, main
    from verifier.cli.train import _FLAGS
    from verifier.train import load_config
    a = build_parser().parse_args(["train", "--ema-decay", "0.999"])
    assert load_config(None, {k: getattr(a, k) for k in _FLAGS}).ema_decay == 0.999
    assert main(["train", "--ema-decay", "1", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "'ema_decay': must lie in [0, 1)" in err, err
    assert not (tmp_path / "o").exists()
