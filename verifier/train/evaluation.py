"""Evaluation of a trained classifier on a test set: clean accuracy, PGD accuracy, certified
accuracy by each bounding method, and certified accuracy against eps; the report files
(JSON + PNG) and the ONNX export.

A sample counts as certified by a method when every margin lower bound ``f_y - f_j`` over the
L-inf ball (clipped to the pixel range [0, 1]) is positive (which implies a correct clean
prediction), and as PGD-robust when it is correctly classified and the attack (``verifier.attack.pgd``
minimizing each margin, ``pgd_steps`` steps from the centre, then ``pgd_restarts - 1`` more
runs from random points of the ball on the samples the first left standing) finds no point
that flips it. A certified sample that PGD breaks would
be a soundness bug: the report counts such samples (``violations``; always 0 when all is well).

With ``cascade=True`` (the default) each method runs only on the samples that the methods
before it in ``methods`` left uncertified, and its entry (named ``"ibp+crown"`` etc.) counts the
samples certified by it or by an earlier one: CROWN and alpha-CROWN cost 10-100x IBP per sample,
and on an IBP-trained model most samples are certified by IBP already.

``budget_s`` caps the time of each method after the first (alpha-CROWN on a large test set
can take hours): once a method has used its budget it is not run on the later batches, the
samples it skipped are counted in ``budget_skipped`` and simply not certified by it, so its
certified accuracy stays a lower bound (sound, possibly low).

Method ``"bab"`` is complete verification: each sample it gets is one call of
``verifier.complete.verify`` (attack, alpha-CROWN, then branch and bound on the ReLU signs)
on the property "no point of the clipped ball makes another class score at least the true
one", within ``bab_timeout`` seconds per sample; ``unsat`` certifies the sample. It runs only on
samples that PGD did not break (a broken one cannot be certified), so after the incomplete
methods it costs at most ``bab_timeout`` times the samples that PGD holds and they left open.
The report counts its verdicts (``bab_verdicts``: unsat / sat / timeout / unknown); a ``sat``
is a counterexample that the evaluation's PGD missed, replayed on the model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..api import BoundedModel, margin_spec
from ..attack import pgd
from ..complete.verify import verify
from ..perturbation import LpBall
from ..report import pyplot, train_figure
from ..spec.vnnlib import OutputConstraint, Region, VnnlibSpec
from .data import Dataset


def _batches(ds: Dataset, bs: int):
    for k in range(0, len(ds), bs):
        yield ds.x[k:k + bs], ds.y[k:k + bs]


def evaluate(net: nn.Module, ds: Dataset, eps: float, methods=("ibp", "crown", "alpha-crown"),
             eps_grid=(), grid_methods=("ibp", "crown-ibp"), pgd_steps: int = 20, batch: int = 100,
             progress: bool = False, cascade: bool = True, budget_s: float | None = None,
             bab_timeout: float = 30.0, pgd_restarts: int = 1) -> dict:
    """-> a dict of accuracies (fractions of ``ds``), times and counts (see the module doc)."""
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds (or None), got {budget_s}")
    if not bab_timeout > 0:
        raise ValueError(f"bab_timeout must be > 0 seconds, got {bab_timeout}")
    if pgd_restarts < 1:
        raise ValueError(f"pgd_restarts must be >= 1, got {pgd_restarts}")
    from tqdm import tqdm
    net = net.eval()
    bm = BoundedModel(net, input_shape=ds.input_shape)
    n = len(ds)
    clean = pgd_ok = 0
    cert = {m: 0 for m in methods}
    times = {m: 0.0 for m in methods}
    skipped = {m: 0 for m in methods}
    violations = 0
    bab_verdicts = {}
    t_pgd = 0.0
    grid = {m: [0] * len(eps_grid) for m in grid_methods}
    bar = tqdm(total=n, desc="evaluate", disable=not progress, leave=False)
    for x, y in _batches(ds, batch):
        x, y = x.to(bm.device), y.to(bm.device)
        with torch.no_grad():
            pred = net(x).argmax(1)
        ok = pred == y
        clean += int(ok.sum())
        C = margin_spec(y, ds.n_classes)
        ball = LpBall(x, eps, clip=(0.0, 1.0))
        t0 = time.perf_counter()
        if eps > 0 and pgd_steps > 0:
            res = pgd(lambda z: net(z), ball, -C, steps=pgd_steps, restarts=1, seed=0)
            robust = ok & (res.value < 0).all(1)
            standing = robust.nonzero().flatten()
            if pgd_restarts > 1 and standing.numel():   # random starts where the centre's failed
                # R - 1 random starts (the centre's run, just done, is not repeated)
                more = pgd(lambda z: net(z), LpBall(x[standing], eps, clip=(0.0, 1.0)),
                           -C[standing], steps=pgd_steps, restarts=pgd_restarts - 1, seed=1,
                           center_start=False)
                robust[standing] = (more.value < 0).all(1)  # value = -margin at the best point
        else:
            robust = ok
        t_pgd += time.perf_counter() - t0
        pgd_ok += int(robust.sum())
        done = torch.zeros_like(ok)
        for j, m in enumerate(methods):
            t0 = time.perf_counter()
            todo = (~done).nonzero().flatten() if cascade else torch.arange(len(y), device=y.device)
            v = torch.zeros_like(ok)
            if m == "bab":       # only where PGD found nothing
                todo = todo[robust[todo]]
            if j > 0 and budget_s is not None and times[m] >= budget_s:
                skipped[m] += todo.numel()      # over its budget: not run, not certified
            elif m == "bab":
                for i in todo.tolist():
                    left = bab_timeout if budget_s is None or j == 0 else \
                        min(bab_timeout, budget_s - (times[m] + time.perf_counter() - t0))
                    if left <= 0:
                        skipped[m] += 1
                        continue
                    status = _complete(bm, x[i], int(y[i]), eps, ds.n_classes, left)
                    bab_verdicts[status] = bab_verdicts.get(status, 0) + 1
                    v[i] = status == "unsat"
            elif todo.numel():
                sub = LpBall(x[todo], eps, clip=(0.0, 1.0))
                v[todo] = bm.bounds(sub, m, spec=C[todo]).verified
            times[m] += time.perf_counter() - t0
            violations += int((v & ~robust).sum())
            done = done | v
            cert[m] += int((done if cascade else v).sum())
        for m in grid_methods:
            for i, e in enumerate(eps_grid):
                v = bm.bounds(LpBall(x, e, clip=(0.0, 1.0)), m, spec=C).verified
                grid[m][i] += int(v.sum())
        bar.update(len(y))
    bar.close()
    return {
        "n": n, "eps": eps, "clean_acc": clean / n, "pgd_acc": pgd_ok / n,
        "pgd_steps": pgd_steps, "pgd_restarts": pgd_restarts,
        "certified_acc": {name: cert[m] / n for name, m in zip(_names(methods, cascade), methods)},
        "certified_mode": ("cascade: each entry counts the samples certified by its last method or "
                           "an earlier one" if cascade else "each method on every sample"),
        "verify_time_s": {m: round(times[m], 3) for m in methods},
        "pgd_time_s": round(t_pgd, 3),
        "violations": violations,
        "budget_s": budget_s,
        "budget_skipped": {m: skipped[m] for m in methods if skipped[m]},
        **({"bab_timeout_s": bab_timeout, "bab_verdicts": bab_verdicts} if "bab" in methods else {}),
        "certified_vs_eps": {"eps": list(eps_grid), **{m: [c / n for c in grid[m]] for m in grid_methods}},
    }


def certified_under_weights(net: nn.Module, ds: Dataset, eps: float, weights,
                            methods=("ibp", "crown-ibp"), batch: int = 100) -> dict:
    """Fraction of ``ds`` certified for every input in the eps ball (a fixed input when eps is
    0) and every model in the weight set ``weights`` (``verifier.weights``), per method."""
    bm = BoundedModel(net.eval(), input_shape=ds.input_shape)
    out = {m: 0 for m in methods}
    for x, y in _batches(ds, batch):
        x, y = x.to(bm.device), y.to(bm.device)
        C = margin_spec(y, ds.n_classes)
        inp = LpBall(x, eps, clip=(0.0, 1.0)) if eps > 0 else x
        for m in methods:
            out[m] += int(bm.bounds(inp, m, spec=C, weights=weights).verified.sum())
    return {m: v / len(ds) for m, v in out.items()}


def _complete(bm: BoundedModel, x: torch.Tensor, label: int, eps: float, n_classes: int,
              timeout: float) -> str:
    """Complete verification of one sample (``verify``'s status): is there a point of the L-inf
    ball of radius ``eps`` around ``x``, clipped to [0, 1], where some class ``j != label``
    scores at least ``label``? One conjunction ``f_label - f_j <= 0`` per other class."""
    flat = x.detach().double().cpu().flatten().numpy()
    lo, hi = np.clip(flat - eps, 0.0, 1.0), np.clip(flat + eps, 0.0, 1.0)
    rows = []
    for j in range(n_classes):
        if j != label:
            c = np.zeros((1, n_classes))
            c[0, label], c[0, j] = 1.0, -1.0
            rows.append(OutputConstraint(c, np.zeros(1)))
    spec = VnnlibSpec(flat.size, n_classes, [Region(lo, hi, rows)])
    return verify(bm, spec, timeout=timeout, methods=("alpha-crown",)).status


def chance_accuracy(labels: torch.Tensor, n_classes: int) -> float:
    """The accuracy of always answering the most frequent class of ``labels`` (1/n_classes on a
    balanced set): what a model that learned nothing scores."""
    counts = torch.bincount(labels.flatten(), minlength=n_classes)
    return float(counts.max()) / max(1, int(counts.sum()))


# a model is "near chance" when its accuracy covers less than this share of the way from chance
# to 1: Cohen's kappa (acc - chance) / (1 - chance) under 0.2, the band that Landis and Koch
# (1977) call "slight" agreement. On 10 balanced classes that is accuracy under 0.28 (the
# README's digits run with too small a learning rate ended at 0.21); on 2 classes under 0.6.
NEAR_CHANCE_KAPPA = 0.2


def near_chance(acc: float, chance: float) -> bool:
    """Whether ``acc`` is near the ``chance`` level (see ``NEAR_CHANCE_KAPPA``)."""
    if chance >= 1:
        return False
    return (acc - chance) / (1 - chance) < NEAR_CHANCE_KAPPA


def _names(methods, cascade):
    return ["+".join(methods[:i + 1]) if cascade else m for i, m in enumerate(methods)]


def plot_report(report: dict, history: list, path) -> None:
    """``report.png``: one panel per thing the run measured (``verifier.report.train_figure``:
    certified accuracy against eps, training curves), no empty panels."""
    plt = pyplot()
    fig = train_figure(report, history, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_onnx(net: nn.Module, input_shape, path) -> None:
    """The model in eval mode as ONNX (input "input" [batch, *input_shape], output "logits")."""
    import warnings
    net = net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        where = next((p.device for p in net.parameters()), torch.device("cpu"))
        torch.onnx.export(net, torch.zeros(1, *input_shape, device=where), str(path), input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
                          opset_version=17)  # what onnx2torch converts (LayerNormalization, Erf...)


def write_report(report: dict, history: list, out_dir) -> dict:
    """``report.json`` and ``report.png`` in ``out_dir``; -> the paths."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps({**report, "history": history}, indent=1) + "\n")
    plot_report(report, history, out_dir / "report.png")
    return {"json": str(out_dir / "report.json"), "png": str(out_dir / "report.png")}
