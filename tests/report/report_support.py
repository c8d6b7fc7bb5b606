"""Helpers of the report tests: sample results files and the decoding of embedded plots."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
VNNCOMP = ROOT / "tests" / "data" / "vnncomp_test"

BATCH_CSV = """\
onnx,vnnlib,status,time_s,method,reason
onnx/a.onnx,vnnlib/a.vnnlib,unsat,0.0250,ibp,every output condition refuted by ibp bounds
onnx/b.onnx,vnnlib/b.vnnlib,sat,0.0190,pgd,counterexample found by PGD and replayed
onnx/c.onnx,vnnlib/c.vnnlib,unknown,2.5000,,bounds and attacks did not decide
onnx/d.onnx,vnnlib/d.vnnlib,timeout,5.0000,,budget of 5 s exhausted
onnx/e.onnx,vnnlib/e.vnnlib,unsat,1.2500,alpha-crown,every output condition refuted <script>x</script>
"""

# benchmarks/vnncomp.py --out: two benchmarks, one wrong verdict (sat where unsat is expected)
VNNCOMP_CSV = """\
benchmark,onnx,vnnlib,status,expected,time_s,method
acasxu,n1.onnx,p1.vnnlib,unsat,unsat,0.5,crown
acasxu,n2.onnx,p2.vnnlib,sat,unsat,0.25,pgd
mnist_fc,m.onnx,q1.vnnlib,unsat,unsat,3.0,relu-bab
mnist_fc,m.onnx,q2.vnnlib,timeout,sat,60.0,
"""

PNG_RE = re.compile(r'<img class="plot" alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def embedded_pngs(page: str) -> dict[str, bytes]:
    """alt text -> decoded PNG bytes of every embedded plot of an HTML page."""
    return {alt: base64.b64decode(b64) for alt, b64 in PNG_RE.findall(page)}


def digits_like(n=40, seed=0):
    from verifier.train.data import Dataset
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g), 3,
                   "random:test")


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


