"""The README's first set-up command, run as written in a fresh virtual environment (no
packages but pip's): it installs what the documented commands need. Then, in that environment,
the commands that used to need packages of the test extra: ``verifier train`` on its default
dataset with a YAML config, and ``verifier verify`` on a sat instance, whose counterexample is
replayed with onnxruntime. The install is CPU-only: no nvidia-* packages, torch's CPU build.

Slow (minutes: it installs torch), so marked ``slow``: ``python -m pytest -m slow
tests/test_readme_setup.py``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tests" / "data" / "vnncomp_test"


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1]
    return re.search(r"```bash no-run\n(.*?)```", setup, re.S).group(1).strip()


def test_the_readme_first_command_is_found():
    cmd = readme_first_command()
    assert cmd.startswith("pip install -r requirements.txt -e . && verifier bounds ")


@pytest.mark.slow
def test_readme_first_command_sets_up_what_documented_commands_need(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               OMP_NUM_THREADS="1")

    def run(cmd, cwd=ROOT):
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=3000)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    out = run(readme_first_command())
    assert "verified: 0 of 1 samples" in out       # as the README says: not at this radius
    # a CPU-only install: torch's CPU build, no nvidia-* (CUDA) packages
    packages = run("pip list --format=freeze").lower().split()
    assert not [p for p in packages if p.startswith(("nvidia-", "triton"))], packages
    assert run("python -c 'import torch; print(torch.version.cuda)'").strip() == "None"
    (tmp_path / "c.yaml").write_text("epochs: 1\nwarmup_epochs: 0\nramp_epochs: 1\n"
                                     "eval_methods: [ibp]\n")
    report = json.loads(run(
        "verifier train --dataset digits --model mlp --model-kwargs '{\"in_dim\": 64, "
        "\"hidden\": [16]}' --eps 0.05 --config c.yaml --test-subset 20 --no-progress --json "
        "--output run", cwd=tmp_path))
    assert report["epochs"] == 1 and report["n"] == 20
    v = json.loads(run(f"verifier verify {BENCH / 'onnx' / 'test_sat.onnx'} "
                       f"{BENCH / 'vnnlib' / 'test_prop.vnnlib'} --json", cwd=tmp_path))
    assert v["status"] == "sat" and v["counterexample"]["replayed_by"] == "onnxruntime"
