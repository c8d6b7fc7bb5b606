"""verifier batch with the in-process scheduler: results stream to the file, a rerun resumes
without recomputing, a run killed mid-way loses only what was running, bad input is one clear
error. (Ray runs: test_ray.py.)"""
import signal
import subprocess
import sys
import time

import pytest
from support import ACAS_SAMPLE, TEST_BENCH, bench_rows, expected, results, write_instances

from verifier.cli import main


def test_rerun_keeps_existing_rows_and_runs_only_the_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    inst = write_instances(tmp_path / "i.csv", bench_rows(TEST_BENCH, 30))
    # a row from "an earlier run" with a verdict no run would produce today: it must survive
    first = bench_rows(TEST_BENCH)[0]
    (tmp_path / "r.csv").write_text("onnx,vnnlib,status,time_s,method,reason\n"
                                    f"{first[0]},{first[1]},unknown,123.0000,,from before\n")
    assert main(["batch", str(inst), "--out", "r.csv"]) == 0
    err = capsys.readouterr().err
    assert "1 of 5 instances already there, 4 to run" in err
    rows = results(tmp_path / "r.csv")
    assert len(rows) == 5
    assert rows[(str(first[0]), str(first[1]))]["reason"] == "from before"
    exp = expected(TEST_BENCH)
    for k, r in rows.items():
        if k != (str(first[0]), str(first[1])):
            assert r["status"] == exp[k], r
    before = (tmp_path / "r.csv").read_bytes()
    assert main(["batch", str(inst), "--out", "r.csv"]) == 0
    assert "5 of 5 instances already there, 0 to run" in capsys.readouterr().err
    assert (tmp_path / "r.csv").read_bytes() == before


def test_killed_run_loses_no_finished_instance_and_resumes(tmp_path):
    """SIGKILL once the first row is on disk; the rerun keeps those rows byte for byte and
    runs the rest."""
    inst = write_instances(tmp_path / "i.csv", bench_rows(ACAS_SAMPLE, 60))
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "verifier", "batch", str(inst), "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:  # header + one row
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    kept = out.read_bytes()
    n_kept = kept.count(b"\n") - 1
    assert 1 <= n_kept < 6
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{n_kept} of 6 instances already there, {6 - n_kept} to run" in r.stderr
    assert out.read_bytes().startswith(kept[:kept.rfind(b"\n") + 1])
    rows = results(out, cwd=tmp_path)  # the runs started in tmp_path
    exp = expected(ACAS_SAMPLE)
    assert {k: r["status"] for k, r in rows.items()} == exp


@pytest.mark.parametrize("content,args,needle", [
    ("onnx/a.onnx,vnnlib/b.vnnlib\n", [], "i.csv:1: expected 'onnx,vnnlib,timeout'"),
    ("a.onnx,b.vnnlib,60\na.onnx,b.vnnlib,soon\n", [], "i.csv:2: bad timeout 'soon'"),
    (None, ["--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (None, ["--ray-address", "127.0.0.1:x"], "port 'x' is not a number"),
    (None, ["--max-retries", "-1"], "must be >= 0"),
    (None, ["--workers", "0"], "must be >= 1"),
])
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, capsys, content, args, needle):
    monkeypatch.chdir(tmp_path)
    if content is None:
        write_instances(tmp_path / "i.csv", bench_rows(TEST_BENCH)[:1])
    else:
        (tmp_path / "i.csv").write_text(content)
    assert main(["batch", "i.csv", "--out", "r.csv", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_workers_without_ray_installed_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    write_instances(tmp_path / "i.csv", bench_rows(TEST_BENCH)[:1])
    assert main(["batch", "i.csv", "--out", "r.csv", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--workers 2 needs the Python package ray" in err and 'pip install -e ".[ray]"' in err


@pytest.mark.parametrize("terminal", [False, True])
def test_the_progress_bar_shows_only_on_a_terminal(tmp_path, monkeypatch, capsys, terminal):
    """A log file (stderr not a terminal) gets no tqdm bar; a terminal does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    inst = write_instances(tmp_path / "i.csv", bench_rows(TEST_BENCH, 30)[:1])
    assert main(["batch", str(inst), "--out", "r.csv"]) == 0
    err = capsys.readouterr().err
    assert ("1/1" in err and "inst" in err) == terminal, err
