"""Ship one model of benchmarks/lipschitz.py into models/: export its ONNX, measure it on the
1,000 MNIST test images, and add (or replace) its entry in models/zoo.json.

    python benchmarks/lipschitz_ship.py runs/lipschitz/muon_spectral_soft_cap_w1.pt lip_mnist_softcap_w1 \
        --command "python benchmarks/lipschitz.py --epochs 5 --crown --out runs/lipschitz"

Measured: clean accuracy, the certified L2 Lipschitz constant, L2 certified accuracy from margins
and by CROWN at r = 0.5 and 1.0, and (for the zoo's common fields) IBP-certified accuracy in the
L-inf ball of radius eps = 0.03 clipped to [0, 1] (that ball lies inside the L2 ball of radius
0.03 · 28 = 0.84).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEST = ROOT.parent / "shared" / "datasets" / "mnist_test1k.npz"
ARCH_KWARGS = {"in_dim": 784, "hidden": [256, 256], "out": 10}
LINF_EPS = 0.03


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state_dict")
    p.add_argument("name")
    p.add_argument("--command", required=True, help="the command that trained it (recorded)")
    p.add_argument("--results", help="the benchmark's results.json (for optimizer, constraint, w_max)")
    a = p.parse_args(argv)

    import torch

    from models.architectures import mlp
    from verifier import BoundedModel, LpBall, margin_spec
    from verifier.lipschitz.train import evaluate_lipschitz
    from verifier.train.data import load_npz
    from verifier.train.evaluation import export_onnx
    torch.set_num_threads(1)
    net = mlp(**ARCH_KWARGS).eval()
    net.load_state_dict(torch.load(a.state_dict, weights_only=True))
    test = load_npz(TEST)
    onnx_path = ROOT / "models" / f"{a.name}.onnx"
    pt_path = ROOT / "models" / f"{a.name}.pt"
    shutil.copyfile(a.state_dict, pt_path)
    export_onnx(net, (1, 28, 28), onnx_path)
    rep = evaluate_lipschitz(net, test, (0.5, 1.0), crown=True)
    bm = BoundedModel.from_onnx(onnx_path)
    ibp = bm.bounds(LpBall(test.x, LINF_EPS, clip=(0, 1)), "ibp", spec=margin_spec(test.y, 10)).verified
    run = {}
    if a.results:
        rows = json.loads(Path(a.results).read_text())
        run = next(r for r in rows if Path(r["state_dict"]).name == Path(a.state_dict).name)
    entry = {
        "name": a.name, "onnx": f"models/{a.name}.onnx", "state_dict": f"models/{a.name}.pt",
        "arch": "mlp", "arch_kwargs": ARCH_KWARGS, "input_shape": [1, 28, 28],
        "dataset": "MNIST (trained on mnist_train10k.npz)", "mean": None, "std": None,
        "method": "lipschitz", "eps": LINF_EPS, "train_eps": None,
        "lipschitz_training": {k: run.get(k) for k in ("optimizer", "constraint", "w_max", "epochs")},
        "command": a.command,
        "measured": {
            "test_set": "the 1000 MNIST test images of mnist_test1k.npz",
            "eps": LINF_EPS,
            "certified_mode": "certified_acc.ibp: IBP in the L-inf ball of eps clipped to [0, 1]",
            "clean_acc": rep["clean_acc"],
            "certified_acc": {"ibp": float(ibp.float().mean())},
            "lipschitz": rep["lipschitz"],
            "l2_certified_acc": rep["certified_acc"],
            "l2_certified_mode": "margin > sqrt(2) * lipschitz * r, logits in float64",
            "crown_l2_certified_acc": rep["crown_certified_acc"],
            "train_time_s": run.get("train_time_s"),
        },
    }
    zoo_path = ROOT / "models" / "zoo.json"
    zoo = json.loads(zoo_path.read_text())
    zoo["models"] = [e for e in zoo["models"] if e["name"] != a.name] + [entry]
    zoo_path.write_text(json.dumps(zoo, indent=1) + "\n")
    print(json.dumps(entry["measured"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
