"""One training run end to end (what ``verifier train`` does): train or resume, then write the
trained model (``model.pt`` state dict, ``model.onnx``), evaluate it on the test set, and write
``report.json`` and ``report.png`` into the output folder."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..weights import WeightPerturbation
from .config import TrainConfig, to_dict
from .evaluation import (certified_under_weights, chance_accuracy, evaluate, export_onnx,
                       near_chance, write_report)
from .trainer import load_data, train


def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """-> the report (also written to ``cfg.output/report.json``). Its ``warnings`` list says
    when the model's clean accuracy is near chance (``near_chance``), with what to change."""
    torch.set_num_threads(cfg.threads)
    train_ds, test_ds = load_data(cfg)
    t0 = time.perf_counter()
    state = train(cfg, resume=resume, progress=progress, data=(train_ds, test_ds))
    train_time = time.perf_counter() - t0
    out = Path(cfg.output)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
    torch.save({k: v.cpu() for k, v in state.net.state_dict().items()}, out / "model.pt")
    if state.raw is not None:   # ema_decay: model.pt is the average, these the last weights
        torch.save({k: v.cpu() for k, v in state.raw.items()}, out / "model_last.pt")
    export_onnx(state.net, train_ds.input_shape, out / "model.onnx")
    t1 = time.perf_counter()
    report = evaluate(state.net, test_ds, cfg.eps, methods=cfg.eval_methods,
                      eps_grid=cfg.eval_eps_grid(), pgd_steps=cfg.eval_pgd_steps,
                      batch=cfg.eval_batch, progress=progress,
                      budget_s=cfg.eval_budget_s, bab_timeout=cfg.eval_bab_timeout_s,
                      pgd_restarts=cfg.eval_pgd_restarts)
    report.update(train_time_s=round(sum(h["time_s"] for h in state.history), 1),
                  session_train_time_s=round(train_time, 1),
                  eval_time_s=round(time.perf_counter() - t1, 1), dataset=test_ds.name,
                  method=cfg.method, train_eps=cfg.eps_train, epochs=cfg.epochs)
    if cfg.ema_decay > 0:
        report["weights"] = (f"the moving average of the weights (ema_decay {cfg.ema_decay:g}); "
                             "the last weights are model_last.pt")
    if cfg.weight_eps > 0:
        w = WeightPerturbation(cfg.weight_params, cfg.weight_eps, relative=cfg.weight_relative)
        report["weight_perturbation"] = {"params": cfg.weight_params, "eps": cfg.weight_eps,
                                         "relative": cfg.weight_relative}
        report["certified_acc_with_weights"] = certified_under_weights(
            state.net, test_ds, cfg.eps, w, batch=cfg.eval_batch)
    report["chance_acc"] = chance_accuracy(test_ds.y, test_ds.n_classes)
    report["warnings"] = []
    if near_chance(report["clean_acc"], report["chance_acc"]):
        report["warnings"].append(
            f"clean accuracy {report['clean_acc']:.2f} is near chance ({report['chance_acc']:.2f}, "
            "the largest class's share of the test set): the model learned little; try more "
            "--epochs, a larger --lr or a smaller --batch-size, a longer --ramp-epochs or a "
            "smaller --train-eps (config keys epochs, lr, batch_size, ramp_epochs, train_eps)")
    write_report(report, state.history, out)
    return report
