"""A Lipschitz-constrained vision transformer beside an unconstrained one, each certified twice.

Both are ``models.architectures.vit_lipschitz`` (7x7 patches, 16 tokens of width 32, 2 blocks of
2-head softmax attention with 1/d logits and a ReLU MLP, convex residuals, no LayerNorm),
trained the same way on the 10,000 MNIST digits of ../shared/datasets/ (Muon on the matrices,
AdamW on the rest, CE(T * logits), same epochs, seed and batches); the constrained one projects
every matrix with the spectral soft cap after each step, the unconstrained one does not (weight
decay only). Each is then certified

* from its Lipschitz constant on the input domain [0, 1]^784 (``lipschitz_constant(...,
  domain=(0, 1))``, attention included): L2 radius r is certified where the float64 margin
  exceeds sqrt(2) L r (all 1,000 test images; the ball intersected with [0, 1]^784, where the
  constant holds); L-inf eps through ||d||_2 <= 28 eps;
* by CROWN on the unclipped L2 ball at the same radii and on the L-inf ball of eps clipped to
  [0, 1], on the first --crown-n test images (CROWN on this ViT takes seconds per image on one
  core); with --alpha-n N, alpha-CROWN then retries the correctly classified images among the
  first N that CROWN left unproved ("CROWN+a": proved by either);
* by IBP in the same L-inf ball on all test images.

    python benchmarks/lipschitz_vit.py --epochs 10 --out runs/lipschitz_vit

With ``--ship NAME`` the constrained model goes into the zoo: models/NAME.pt and .onnx and an
entry in models/zoo.json with the figures measured here (``models.trained(NAME)`` loads it).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"


def certify(net, test, radii, eps, crown_n, alpha_n, domain):
    import torch

    from verifier.analysis.lipschitz import crown_l2, lipschitz_certify, lipschitz_constant
    from verifier.api import BoundedModel, margin_spec
    from verifier.errors import VerifierError
    from verifier.perturbation import LpBall
    row = {}
    t0 = time.perf_counter()
    try:
        L = lipschitz_constant(net, test.input_shape, domain=domain).lipschitz
    except VerifierError as e:   # e.g. IBP over the domain overflows the softmax
        L, row["lipschitz_error"] = math.inf, str(e).splitlines()[0]
    row["lipschitz"] = L
    row["n_test"] = len(test)
    row["lipschitz_time_s"] = round(time.perf_counter() - t0, 2)
    c = lipschitz_certify(net, test.x, test.y, L, radii + [math.sqrt(test.x[0].numel()) * eps])
    row["clean_acc"] = c["clean_acc"]
    row["lip_l2"] = {str(r): c["certified_acc"][str(r)] for r in radii}
    row["lip_linf"] = c["certified_acc"][str(math.sqrt(test.x[0].numel()) * eps)]
    x, y = test.x[:crown_n], test.y[:crown_n]
    sub = lipschitz_certify(net, x, y, L, radii + [math.sqrt(test.x[0].numel()) * eps])
    row["lip_l2_subset"] = {str(r): sub["certified_acc"][str(r)] for r in radii}
    row["lip_linf_subset"] = sub["certified_acc"][str(math.sqrt(test.x[0].numel()) * eps)]
    row["clean_acc_subset"] = sub["clean_acc"]
    model = BoundedModel(net, input_shape=test.input_shape, dtype=torch.float64)
    t0 = time.perf_counter()
    row["ibp_linf"] = float(model.bounds(
        LpBall(test.x.to(torch.float64), eps, norm="inf", clip=(0.0, 1.0)), method="ibp",
        spec=margin_spec(test.y, 10, dtype=torch.float64)).verified.double().mean())
    row["ibp_time_s"] = round(time.perf_counter() - t0, 1)
    balls = [("l2", r) for r in radii] + [("linf", eps)]

    def run(method, idx, kind, r):
        xs, ys = x[idx], y[idx]
        if len(idx) == 0:
            return torch.zeros(0, dtype=torch.bool)
        if kind == "l2":
            return crown_l2(net, xs, ys, r, method=method)["verified"].cpu()
        res = model.bounds(LpBall(xs.to(torch.float64), r, norm="inf", clip=(0.0, 1.0)),
                           method=method, spec=margin_spec(ys, 10, dtype=torch.float64))
        return res.verified.cpu()

    t0 = time.perf_counter()
    crown = {}
    for kind, r in balls:
        crown[(kind, r)] = run("crown", torch.arange(len(x)), kind, r)
    row["crown_time_s"] = round(time.perf_counter() - t0, 1)
    row["crown_l2"] = {str(r): float(crown[("l2", r)].double().mean()) for r in radii}
    row["crown_linf"] = float(crown[("linf", eps)].double().mean())
    if alpha_n:
        # alpha-CROWN only where it can add something: the correctly classified images among
        # the first alpha_n that CROWN left unproved (a proved margin stays proved).
        with torch.no_grad():
            correct = copy.deepcopy(net).double()(x.to(torch.float64)).argmax(1).cpu() == y.cpu()
        t0 = time.perf_counter()
        row["alpha_n"] = min(alpha_n, len(x))
        both, tried = {}, {}
        for kind, r in balls:
            ok = crown[(kind, r)].clone()
            idx = torch.nonzero(~ok[:alpha_n] & correct[:alpha_n]).flatten()
            ok[idx] = run("alpha-crown", idx, kind, r)
            both[(kind, r)], tried[f"{kind} {r:g}"] = ok, len(idx)
        row["alpha_time_s"] = round(time.perf_counter() - t0, 1)
        row["alpha_tried"] = tried
        row["crown_alpha_l2"] = {str(r): float(both[("l2", r)].double().mean()) for r in radii}
        row["crown_alpha_linf"] = float(both[("linf", eps)].double().mean())
    return row


def ship(a, row, state_path, mk) -> None:
    import shutil

    import torch

    from models.architectures import vit_lipschitz
    from verifier.train.evaluation import export_onnx
    net = vit_lipschitz(**mk)
    net.load_state_dict(torch.load(state_path, weights_only=True))
    shutil.copyfile(state_path, ROOT / "models" / f"{a.ship}.pt")
    export_onnx(net, (1, 28, 28), ROOT / "models" / f"{a.ship}.onnx")
    cmd = "python benchmarks/lipschitz_vit.py " + " ".join(argv_for_record(a))
    entry = {
        "name": a.ship, "onnx": f"models/{a.ship}.onnx", "state_dict": f"models/{a.ship}.pt",
        "arch": "vit_lipschitz", "arch_kwargs": mk, "input_shape": [1, 28, 28],
        "dataset": "MNIST (trained on mnist_train10k.npz)", "mean": None, "std": None,
        "method": "lipschitz", "eps": a.eps, "train_eps": None,
        "lipschitz_training": {"optimizer": "muon", "constraint": "spectral_soft_cap",
                               "w_max": 1.0, "epochs": a.epochs, "temperature": a.temperature},
        "lipschitz_domain": [0.0, 1.0],
        "command": cmd,
        "measured": {
            "test_set": "the 1000 MNIST test images of mnist_test1k.npz",
            "eps": a.eps,
            "certified_mode": f"certified_acc.ibp: IBP in the L-inf ball of eps clipped to [0, 1], "
                              f"all {row['n_test']} test images; certified_acc.crown: CROWN in the "
                              f"same ball, first {a.crown_n} test images",
            "clean_acc": row["clean_acc"],
            "certified_acc": {"ibp": row["ibp_linf"], "crown": row["crown_linf"]},
            "lipschitz": row["lipschitz"],
            "lipschitz_mode": "L2 constant on inputs in [0, 1]^784, attention included "
                              "(lipschitz_constant(net, (1, 28, 28), domain=(0, 1)))",
            "l2_certified_acc": row["lip_l2"],
            "l2_certified_mode": "margin > sqrt(2) * lipschitz * r, logits in float64, the ball "
                                 "within [0, 1]^784, all 1000 test images",
            "crown_l2_certified_acc": row["crown_l2"],
            "crown_l2_mode": f"CROWN, unclipped L2 ball, first {a.crown_n} test images",
            **({"crown_alpha_certified_acc": row["crown_alpha_linf"],
                "crown_alpha_l2_certified_acc": row["crown_alpha_l2"],
                "crown_alpha_mode": f"proved by CROWN or by alpha-CROWN (alpha-CROWN tried on "
                                    f"CROWN's unproved, correctly classified images among the "
                                    f"first {row['alpha_n']})"} if "alpha_n" in row else {}),
            "train_time_s": row["train_time_s"],
        },
    }
    zoo_path = ROOT / "models" / "zoo.json"
    zoo = json.loads(zoo_path.read_text())
    zoo["models"] = [e for e in zoo["models"] if e["name"] != a.ship] + [entry]
    zoo_path.write_text(json.dumps(zoo, indent=1) + "\n")
    print(f"shipped models/{a.ship}.pt, .onnx and its zoo.json entry")


def argv_for_record(a) -> list[str]:
    return [f"--epochs {a.epochs}", f"--temperature {a.temperature:g}",
            f"--model-kwargs '{a.model_kwargs}'", f"--crown-n {a.crown_n}",
            *([f"--alpha-n {a.alpha_n}"] if a.alpha_n else []),
            f"--radii {' '.join(f'{r:g}' for r in a.radii)}", f"--eps {a.eps:g}",
            f"--out {a.out}", f"--ship {a.ship}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--radii", type=float, nargs=3, default=[0.1, 0.3, 0.5])
    p.add_argument("--eps", type=float, default=0.01, help="the L-inf radius")
    p.add_argument("--temperature", type=float, default=16.0)
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of vit_lipschitz")
    p.add_argument("--crown-n", type=int, default=20, help="CROWN on the first N test images")
    p.add_argument("--alpha-n", type=int, default=0,
                   help="then alpha-CROWN on CROWN's unproved, correctly classified images among "
                        "the first N (it costs about 10x CROWN per image on this ViT)")
    p.add_argument("--data", default=str(DATA), help="folder of mnist_train10k.npz, mnist_test1k.npz")
    p.add_argument("--out", default="runs/lipschitz_vit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", metavar="NAME", help="ship the constrained model into the zoo")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from verifier.lipschitz.train import LipschitzConfig, train_lipschitz
    from verifier.train.data import load_npz
    torch.set_num_threads(1)
    train = load_npz(Path(a.data) / "mnist_train10k.npz")
    test = load_npz(Path(a.data) / "mnist_test1k.npz")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mk = json.loads(a.model_kwargs)
    rows = {}
    for name, constraint in (("constrained", "spectral_soft_cap"), ("unconstrained", "weight_decay")):
        cfg = LipschitzConfig(model="vit_lipschitz", model_kwargs=mk, constraint=constraint,
                              epochs=a.epochs, temperature=a.temperature, seed=a.seed, threads=1)
        res = train_lipschitz(cfg, train)
        torch.save(res.net.state_dict(), out / f"vit_{name}.pt")
        row = certify(res.net, test, a.radii, a.eps, a.crown_n, a.alpha_n, (0.0, 1.0))
        row.update(constraint=constraint, train_time_s=round(res.train_time_s, 1),
                   epochs=a.epochs, temperature=a.temperature, model_kwargs=mk)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    if a.ship:
        ship(a, rows["constrained"], out / "vit_constrained.pt", mk)
    rk = [str(r) for r in a.radii]
    n = a.crown_n
    print(f"\nMNIST vit_lipschitz {mk}, {a.epochs} epochs, T={a.temperature:g}; Lipschitz "
          f"certificates on all {len(test)} test images (in brackets: the first {n}), CROWN on "
          f"the first {n}")
    cols = ["clean", "L (on [0,1])"] + [f"Lip L2 {r}" for r in rk] + [f"CROWN L2 {r}" for r in rk] \
        + [f"Lip Linf {a.eps:g}", f"CROWN Linf {a.eps:g}"]
    cols += [f"IBP Linf {a.eps:g}"]
    if a.alpha_n:
        cols += [f"CROWN+a L2 {r}" for r in rk] + [f"CROWN+a Linf {a.eps:g}"]
    print("| model | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, r in rows.items():
        vals = [f"{r['clean_acc']:.3f}", f"{r['lipschitz']:.4g}"]
        vals += [f"{r['lip_l2'][k]:.3f} ({r['lip_l2_subset'][k]:.2f})" for k in rk]
        vals += [f"{r['crown_l2'][k]:.2f}" for k in rk]
        vals += [f"{r['lip_linf']:.3f} ({r['lip_linf_subset']:.2f})", f"{r['crown_linf']:.2f}"]
        vals += [f"{r['ibp_linf']:.3f}"]
        if a.alpha_n:
            vals += [f"{r['crown_alpha_l2'][k]:.2f}" for k in rk] + [f"{r['crown_alpha_linf']:.2f}"]
        print(f"| {name} | " + " | ".join(vals) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
