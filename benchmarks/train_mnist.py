"""Certified training benchmark (not part of the test suite): train, then evaluate on the test
images; prints clean / PGD / certified accuracy and wall time.

    python benchmarks/train_mnist.py mnist-0.1        # MNIST, 10k training digits, eps 0.1
    python benchmarks/train_mnist.py mnist-0.3        # eps 0.3
    python benchmarks/train_mnist.py fashion-0.1      # Fashion-MNIST, full set, eps 0.1
    python benchmarks/train_mnist.py mnist-0.1 --width 16 --fc 256 --ship models/   # smaller model
    python benchmarks/train_mnist.py mnist-0.3 --extra-convs 1     # a 3x3 convolution more per stage
    python benchmarks/train_mnist.py mnist-0.3 --method mtl-ibp --alpha 0.5 --pgd-steps 1
    python benchmarks/train_mnist.py mnist-0.1 --method ibp sabr        # two runs, one table
    python benchmarks/train_mnist.py --table runs/mnist-0.1 runs/mnist-0.1-sabr   # finished runs

MNIST: trained on /work/shared/datasets/mnist_train10k.npz (or --data-dir), evaluated on the
1,000 test images of mnist_test1k.npz; Fashion-MNIST: the IDX files of Debian's
dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), evaluated on the first 1,000 test
images (--test-subset). Each run is the same as ``verifier train`` with the config printed
first. ``--ship DIR`` copies the trained model (.pt state dict + .onnx) into DIR and records it
in DIR/zoo.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path("/work/shared/datasets")
FASHION = Path("/usr/share/datasets/fashion-mnist")

# the model: cnn_cert with BatchNorm (IBP initialization), IBP loss, smooth eps ramp
_COMMON = dict(model="cnn_cert", model_kwargs={"width": 32, "fc": 256, "bn": True}, method="ibp",
               ibp_init=True, batch_size=100, lr=5e-4, lr_decay=0.2, schedule="smooth",
               kappa_start=1.0, kappa_end=0.0, reg_weight=0.5, grad_clip=10.0,
               eval_methods=["ibp", "crown", "alpha-crown"], eval_pgd_steps=50,
               eval_pgd_restarts=10)

RUNS = {
    "mnist-0.1": dict(dataset="npz", eps=0.1, train_eps=0.2, epochs=80, warmup_epochs=1,
                      ramp_epochs=27, lr_milestones=[60, 73], eval_eps=[0.05, 0.1, 0.15, 0.2]),
    "mnist-0.3": dict(dataset="npz", eps=0.3, train_eps=0.4, epochs=60, warmup_epochs=1,
                      ramp_epochs=25, lr_milestones=[45, 55], eval_eps=[0.1, 0.2, 0.3, 0.35, 0.4]),
    "fashion-0.1": dict(dataset="idx", eps=0.1, train_eps=0.15, epochs=12, warmup_epochs=1,
                        ramp_epochs=5, lr_milestones=[9, 11], test_subset=1000,
                        eval_eps=[0.02, 0.05, 0.1, 0.15],
                        # alpha-CROWN on the ~270 images IBP leaves open took over 40 minutes
                        eval_methods=["ibp", "crown"]),
    # the zoo's naturally trained baseline: same architecture without BatchNorm, plain
    # cross-entropy, certified (if at all) only at a small radius
    "mnist-natural": dict(dataset="npz", method="natural", model_kwargs={"bn": False},
                          ibp_init=False, eps=0.01, train_eps=0.01, epochs=10, warmup_epochs=0,
                          ramp_epochs=1, lr=1e-3, lr_milestones=[7, 9],
                          eval_eps=[0.005, 0.01, 0.02, 0.05]),
}


# the command-line options that become config keys of the same name when given
PASSED = ("alpha", "sabr_lambda", "pgd_steps", "train_eps", "augment_shift", "lr", "batch_size",
          "ema_decay")


def config_for(name: str, args, method: str | None = None) -> dict:
    tag = (f"-{method}" if method else "") + ("-lf" if args.loss_fusion else "")
    out = args.output if args.output and len(args.runs) * len(args.method or [None]) == 1 else None
    d = {**_COMMON, **RUNS[name], "seed": args.seed, "threads": args.threads,
         "output": out or (f"{args.output}/{name}{tag}" if args.output else f"runs/{name}{tag}")}
    d["model_kwargs"] = {**_COMMON["model_kwargs"], **RUNS[name].get("model_kwargs", {}),
                         "width": args.width, "fc": args.fc}
    if args.extra_convs:
        d["model_kwargs"]["extra_convs"] = args.extra_convs
    if method is not None:   # another loss on the same recipe (verifier.train.mixed)
        if d["method"] == "natural":
            raise SystemExit(f"{name}: the natural baseline takes no --method")
        d["method"] = method
    if args.loss_fusion:
        d["loss_fusion"] = True
    for key in PASSED:
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    if args.eval_methods:
        d["eval_methods"] = list(args.eval_methods)
    if args.eval_budget is not None:
        d["eval_budget_s"] = args.eval_budget
    if args.bab_timeout is not None:
        d["eval_bab_timeout_s"] = args.bab_timeout
    if args.pgd_restarts is not None:
        d["eval_pgd_restarts"] = args.pgd_restarts
    if d["dataset"] == "npz":
        data = Path(args.data_dir or SHARED)
        d.update(train_path=str(data / "mnist_train10k.npz"), test_path=str(data / "mnist_test1k.npz"))
    else:
        d.update(train_path=str(args.data_dir or FASHION))
    if args.epochs is not None:  # a shorter run (smoke tests): scale the schedule down
        f = args.epochs / d["epochs"]
        d["epochs"] = args.epochs
        d["ramp_epochs"] = max(1, min(args.epochs - d["warmup_epochs"], round(d["ramp_epochs"] * f)))
        d["lr_milestones"] = [max(1, round(m * f)) for m in d["lr_milestones"]]
    return d


def table(dirs: list[Path]) -> str:
    """The markdown table of finished runs: method x eps, clean, PGD, certified by IBP and by the
    cascade's later methods (IBP, then CROWN, then alpha-CROWN: each column counts what its
    method or an earlier one proved; "-" where the run did not evaluate it; then "+BaB", the
    complete method, where the run has it), training time."""
    rows = ["| data, eps | method | epochs | clean | PGD | certified: IBP / +CROWN / +alpha-CROWN "
            "(/ +BaB) | training time |", "|---|---|---|---|---|---|---|"]
    for d in dirs:
        rep = json.loads((d / "report.json").read_text())
        cfg = json.loads((d / "config.json").read_text())
        c = rep["certified_acc"]
        cert = " / ".join(f"{100 * c[k]:.1f}%" if k in c else "-"
                          for k in ("ibp", "ibp+crown", "ibp+crown+alpha-crown"))
        cert += "".join(f" / +BaB {100 * v:.1f}%" for k, v in c.items() if k.endswith("+bab"))
        m = cfg["method"] + (" (fused)" if cfg.get("loss_fusion") else "")
        extra = {"mtl-ibp": f" alpha {cfg.get('alpha')}", "cc-ibp": f" alpha {cfg.get('alpha')}",
                 "sabr": f" lambda {cfg.get('sabr_lambda')}"}.get(cfg["method"], "")
        data = {"npz": "MNIST", "digits": "digits"}.get(
            cfg["dataset"], "Fashion-MNIST" if "fashion" in str(cfg.get("train_path")).lower() else "IDX")
        kw = cfg.get("model_kwargs") or {}
        if (kw.get("width", 32), kw.get("fc", 256)) != (32, 256):
            extra += f", width {kw.get('width', 32)} fc {kw.get('fc', 256)}"
        if kw.get("extra_convs"):
            extra += f", {kw['extra_convs']} extra conv(s) per stage"
        if cfg.get("augment_shift"):
            extra += f", shifts of up to {cfg['augment_shift']} px"
        if cfg.get("lr", _COMMON["lr"]) != _COMMON["lr"]:
            extra += f", lr {cfg['lr']:g}"
        if cfg.get("batch_size", _COMMON["batch_size"]) != _COMMON["batch_size"]:
            extra += f", batch {cfg['batch_size']}"
        if cfg.get("ema_decay"):
            extra += f", EMA {cfg['ema_decay']:g}"
        if cfg.get("seed"):
            extra += f", seed {cfg['seed']}"
        trained = f" (trained at {cfg['train_eps']:g})" if cfg.get("train_eps") is not None else ""
        rows.append(f"| {data} {cfg['eps']:g}{trained} | {m}{extra} | {cfg['epochs']} | "
                    f"{100 * rep['clean_acc']:.1f}% | {100 * rep['pgd_acc']:.1f}% | {cert} | "
                    f"{rep['train_time_s']:.0f} s |")
    return "\n".join(rows)


def ship(name: str, cfg, out_dir: Path, report: dict, dest: Path, command: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    stem = ("nat_mnist" if cfg.method == "natural"
            else f"cert_{name.replace('-', '_').replace('.', '')}")
    shutil.copy(out_dir / "model.pt", dest / f"{stem}.pt")
    shutil.copy(out_dir / "model.onnx", dest / f"{stem}.onnx")
    zoo_path = dest / "zoo.json"
    zoo = json.loads(zoo_path.read_text()) if zoo_path.exists() else {"models": []}
    zoo["models"] = [m for m in zoo["models"] if m["name"] != stem]
    def rel(p: Path) -> str:  # relative to the repo when shipped into it
        p = p.resolve()
        return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
    cert = report["certified_acc"]
    best = max(cert, key=cert.get)
    zoo["models"].append({
        "name": stem, "onnx": rel(dest / f"{stem}.onnx"), "state_dict": rel(dest / f"{stem}.pt"),
        "arch": cfg.model, "arch_kwargs": cfg.model_kwargs, "input_shape": [1, 28, 28],
        "dataset": "MNIST (trained on mnist_train10k.npz)" if cfg.dataset == "npz" else
                   "Fashion-MNIST (full training set)",
        "mean": None, "std": None, "method": cfg.method, "eps": cfg.eps, "train_eps": cfg.eps_train,
        "command": command,
        "measured": {"test_set": (f"the {report['n']} MNIST test images of mnist_test1k.npz"
                                  if cfg.dataset == "npz" else f"the first {report['n']} test images"),
                     "eps": cfg.eps, "certified_mode": report["certified_mode"],
                     "clean_acc": report["clean_acc"],
                     "pgd_acc": report["pgd_acc"], "pgd": f"{report['pgd_steps']}-step PGD on every margin, "
                            f"{report.get('pgd_restarts', 1)} start(s)",
                     "certified_acc": cert, "best_verification_method": best,
                     "train_time_s": report.get("train_time_s"),
                     "eval_time_s": report.get("eval_time_s")},
    })
    zoo_path.write_text(json.dumps(zoo, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help=f"{', '.join(sorted(RUNS))} (default mnist-0.1 mnist-0.3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="shorter runs (the schedule is scaled down)")
    p.add_argument("--width", type=int, default=32, help="cnn_cert: channels of the first convolution")
    p.add_argument("--fc", type=int, default=256, help="cnn_cert: width of the hidden dense layer")
    p.add_argument("--extra-convs", type=int, default=0, metavar="K",
                   help="cnn_cert: K 3x3 stride-1 convolutions after each strided one (default 0)")
    p.add_argument("--method", nargs="+", choices=["ibp", "crown-ibp", "mtl-ibp", "cc-ibp", "sabr"],
                   help="the training loss, or several: one run each, one table (default ibp; "
                        "see verifier train --help)")
    p.add_argument("--loss-fusion", action="store_true",
                   help="crown-ibp: bound the cross-entropy itself (one backward row per sample)")
    p.add_argument("--table", nargs="+", metavar="DIR",
                   help="only print the table of finished runs (their report.json and config.json)")
    p.add_argument("--alpha", type=float, help="mtl-ibp / cc-ibp: the IBP share (default 0.5)")
    p.add_argument("--sabr-lambda", type=float, help="sabr: small-box radius / eps (default 0.4)")
    p.add_argument("--pgd-steps", type=int, help="steps of the training attack (default 5)")
    p.add_argument("--augment-shift", type=int, metavar="K",
                   help="move each training image by up to K pixels per axis (default 0)")
    p.add_argument("--lr", type=float, help="Adam's learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 100)")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help="ship a moving average of the weights, decay D per step (default 0: off)")
    p.add_argument("--train-eps", type=float, help="the radius trained at (default: the run's, "
                   "e.g. 0.4 for mnist-0.3)")
    p.add_argument("--eval-methods", nargs="+", help="verification methods of the report, run in a "
                   "cascade (default ibp crown alpha-crown)")
    p.add_argument("--eval-budget", type=float, metavar="S",
                   help="seconds each evaluation method after IBP may take (default: no cap)")
    p.add_argument("--pgd-restarts", type=int, metavar="R",
                   help="PGD starts of the evaluation per image: the centre, then R-1 random ones "
                        "(default 10)")
    p.add_argument("--bab-timeout", type=float, metavar="S",
                   help="seconds per test image of the complete method bab (--eval-methods ... "
                        "bab; default 30)")
    p.add_argument("--output", help="the run folder (default runs/NAME)")
    p.add_argument("--data-dir", help="where the datasets are (default: the shared/Debian folders)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ship", metavar="DIR", help="copy the model into DIR and record it in DIR/zoo.json")
    a = p.parse_args()
    if a.table:
        missing = [d for d in a.table if not all((Path(d) / f).is_file()
                                                 for f in ("report.json", "config.json"))]
        if missing:
            p.error(f"--table: {', '.join(missing)} hold no finished run (report.json and "
                    "config.json)")
        print(table([Path(d) for d in a.table]))
        return 0
    if a.extra_convs < 0:
        p.error(f"--extra-convs {a.extra_convs}: the number of extra convolutions is 0 or more")
    if a.loss_fusion and a.method != ["crown-ibp"]:
        p.error("--loss-fusion fuses CROWN-IBP's bound: it needs --method crown-ibp (alone)")
    a.runs = a.runs or ["mnist-0.1", "mnist-0.3"]
    unknown = [r for r in a.runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(sorted(RUNS))}")
    from verifier.train.config import ConfigError, from_dict
    from verifier.train.run import run_training
    # every run's config is checked before the first one trains
    plan = [(name, method, config_for(name, a, method))
            for name in a.runs for method in (a.method or [None])]
    try:
        cfgs = [from_dict(d) for _, _, d in plan]
    except ConfigError as e:
        p.error(str(e))
    done = []
    for (name, method, d), cfg in zip(plan, cfgs):
        print(f"== {name}: {json.dumps(d)}", flush=True)
        t0 = time.perf_counter()
        report = run_training(cfg, resume=a.resume, progress=sys.stderr.isatty())
        wall = time.perf_counter() - t0
        done.append(Path(cfg.output))
        c = report["certified_acc"]
        print(f"{name}: clean {report['clean_acc']:.3f}  PGD {report['pgd_acc']:.3f}  certified "
              + "  ".join(f"{m} {v:.3f}" for m, v in c.items())
              + f"  (n={report['n']}, eps={cfg.eps}; train {report['train_time_s']:.0f} s, "
              f"wall {wall:.0f} s, violations {report['violations']})", flush=True)
        if a.ship:
            cmd = (f"python benchmarks/train_mnist.py {name} --width {a.width} --fc {a.fc} "
                   + (f"--extra-convs {a.extra_convs} " if a.extra_convs else "")
                   + (f"--method {method} " if method else "")
                   + ("--loss-fusion " if a.loss_fusion else "")
                   + "".join(f"--{k.replace('_', '-')} {getattr(a, k):g} "
                             for k in PASSED if getattr(a, k) is not None)
                   + (f"--epochs {a.epochs} " if a.epochs is not None else "")
                   + (f"--eval-methods {' '.join(a.eval_methods)} " if a.eval_methods else "")
                   + (f"--eval-budget {a.eval_budget:g} " if a.eval_budget is not None else "")
                   + (f"--bab-timeout {a.bab_timeout:g} " if a.bab_timeout is not None else "")
                   + (f"--pgd-restarts {a.pgd_restarts} " if a.pgd_restarts is not None else "")
                   + f"--threads {a.threads} --seed {a.seed}")
            ship(name, cfg, Path(cfg.output), report, Path(a.ship), cmd)
    print()
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
