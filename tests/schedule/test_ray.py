"""verifier batch and branch and bound on a local Ray of 2 workers: the same verdicts as in
this process, a killed worker loses no instance, a task hanging past its hard limit is killed
and reported, a rerun resumes without recomputing; the Ray branch-and-bound pool agrees with the
in-process one (input and ReLU splits), stops at the deadline and on cancel, and survives or
reports a killed actor. Skipped when Ray is not installed."""
import os
import signal
import threading
import time

import pytest
import torch
from support import (ACAS_SAMPLE, SHARED, TEST_BENCH, bench_rows, descendants_named, expected,
                     least_output, results, write_instances)

ray = pytest.importorskip("ray")
# each test starts a local Ray: run them one after another in one test process
pytestmark = pytest.mark.xdist_group("ray")

from verifier.cli import main  # noqa: E402

# the retry tests' tasks live in this module, which Ray's workers cannot import: send them by value
ray.cloudpickle.register_pickle_by_value(__import__(__name__))
from verifier.schedule.ray_batch import RayScheduler  # noqa: E402


_LOAD_BEFORE_RAY: list[float] = []   # the one-minute load average when the module's Ray started


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the schedulers join it, never shut it down). The runs use
    2 workers (--workers 2, 2 actors); Ray is told of 6 logical CPUs so that the two pools'
    actors, which hold one each, can never starve a batch's tasks whatever the test order."""
    import logging
    _LOAD_BEFORE_RAY.append(os.getloadavg()[0])
    ray.init(num_cpus=6, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield
    ray.shutdown()


def _skip_when_starved() -> None:
    """The timing tests below measure how fast Ray's actors and raylet answer. With two CPU-bound
    jobs beside the suite (a one-minute load average of 4 to 5 on 2 cores) they starve: a kill
    took 45 s and a cancel 35 s that take about a second on an idle machine. Such a test is
    skipped, with the load in its reason, rather than failed, when the load before Ray started
    (Ray's own processes add one or two) was above 1.5 per core; the suite alone (two workers)
    keeps it at about one per core."""
    load, cores = max(_LOAD_BEFORE_RAY, default=0.0), os.cpu_count() or 1
    if load > 1.5 * cores:
        pytest.skip(f"load average {load:.1f} on {cores} cores before Ray started: its timing "
                    "is not measurable")


# -- tasks for the retry tests (top level: Ray pickles them by reference) ---------------------

def _die_once(marker, x):
    """SIGKILLs its own worker the first time (a marker file remembers), then returns 2x."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return 2 * x


def _die_always(x):
    os.kill(os.getpid(), signal.SIGKILL)


def _raise(x):
    raise ValueError(f"bad {x}")


def test_worker_killed_once_is_retried_and_one_killed_every_time_is_an_error(local_ray, tmp_path):
    s = RayScheduler(2, max_retries=2)
    out = dict(s.run(_die_once, [(str(tmp_path / "m0"), 1), (str(tmp_path / "m1"), 2)]))
    assert {i: (o.value, o.error, o.attempts) for i, o in out.items()} == \
        {0: (2, None, 2), 1: (4, None, 2)}
    out = dict(RayScheduler(2, max_retries=1).run(_die_always, [(1,)]))
    assert out[0].value is None and out[0].attempts == 2
    assert "its worker died 2 times (retried 1)" in out[0].error
    out = dict(s.run(_raise, [(7,)]))   # an exception is the task's own: not retried
    assert out[0].attempts == 1 and out[0].error == "ValueError: bad 7"


def _hang(seconds):
    time.sleep(seconds)
    return "woke"


def test_a_task_hanging_past_its_hard_limit_is_killed_and_the_others_finish(local_ray):
    """The hard limit applies only on a local Ray the scheduler started itself; this module's
    Ray is shared, so the test sets the limit on the scheduler directly (1 s for the hanging
    task, none for the quick ones)."""
    _skip_when_starved()
    s = RayScheduler(2, max_retries=2)
    s.hard_limit = lambda args: 1.0 if args[0] > 5 else 1e9
    t0 = time.perf_counter()
    out = dict(s.run(_hang, [(60,), (0.1,), (0.2,), (0.1,)]))
    assert time.perf_counter() - t0 < 15            # not the 60 s the task asked for
    assert out[0].value is None and out[0].attempts == 1   # killed once, not retried
    assert out[0].error == "killed after running 1 s, past its timeout"
    assert {i: (o.value, o.error) for i, o in out.items() if i} == \
        {1: ("woke", None), 2: ("woke", None), 3: ("woke", None)}


def _verdicts(path):
    return {k: r["status"] for k, r in results(path).items()}


def test_ray_batch_verdicts_survive_a_killed_worker_and_a_rerun_resumes(local_ray, tmp_path,
                                                                         monkeypatch, capsys):
    """test + acasxu sample with --workers 2 give the verdicts of expected.csv, which the
    in-process scheduler gives too (test_batch.py, tests/complete/test_verify.py). During the
    run a worker is SIGKILLed while it runs an instance: every instance still gets its verdict
    (the killed one retried); the rerun runs nothing and leaves the file as it was."""
    monkeypatch.chdir(tmp_path)
    inst = write_instances(tmp_path / "i.csv", bench_rows(TEST_BENCH, 60) + bench_rows(ACAS_SAMPLE, 60))
    killed = []

    def kill_one_running_task():
        t0 = time.time()
        while not killed and time.time() - t0 < 60:
            for pid in descendants_named("ray::_run_task"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_running_task)
    killer.start()
    assert main(["batch", str(inst), "--out", "ray.csv", "--workers", "2"]) == 0
    killer.join()
    assert killed, "no running task was seen to kill"
    exp = {**expected(TEST_BENCH), **expected(ACAS_SAMPLE)}
    assert _verdicts("ray.csv") == exp          # nothing lost to the kill, nothing an error
    capsys.readouterr()
    before = (tmp_path / "ray.csv").read_bytes()
    assert main(["batch", str(inst), "--out", "ray.csv", "--workers", "2"]) == 0
    assert "11 of 11 instances already there, 0 to run" in capsys.readouterr().err
    assert (tmp_path / "ray.csv").read_bytes() == before


SHARED_SLICE = {  # quick instances of the shared benchmarks (in-process: each under ~3 s)
    "test": None,  # all of it
    "acasxu": [("ACASXU_run2a_1_1_batch_2000.onnx", "prop_1"), ("ACASXU_run2a_1_9_batch_2000.onnx", "prop_1"),
               ("ACASXU_run2a_2_4_batch_2000.onnx", "prop_3"), ("ACASXU_run2a_2_7_batch_2000.onnx", "prop_2"),
               ("ACASXU_run2a_1_2_batch_2000.onnx", "prop_2"), ("ACASXU_run2a_3_1_batch_2000.onnx", "prop_4")],
}


@pytest.mark.parametrize("bench", sorted(SHARED_SLICE))
def test_ray_batch_on_the_shared_benchmarks_matches_in_process(local_ray, tmp_path, monkeypatch,
                                                              bench):
    if not (SHARED / bench).exists():
        pytest.skip(f"../shared/benchmarks/vnncomp/{bench} is not present")
    monkeypatch.chdir(tmp_path)
    d = SHARED / bench
    pick = SHARED_SLICE[bench]
    rows = bench_rows(d, 30) if pick is None else \
        [(d / "onnx" / o, d / "vnnlib" / f"{p}.vnnlib", 30) for o, p in pick]
    inst = write_instances(tmp_path / "i.csv", rows)
    assert main(["batch", str(inst), "--out", "local.csv"]) == 0
    assert main(["batch", str(inst), "--out", "ray.csv", "--workers", "2"]) == 0
    local, dist = _verdicts("local.csv"), _verdicts("ray.csv")
    assert local == dist
    assert len(dist) == len(rows) and "error" not in dist.values()


# -- branch and bound on Ray actors ------------------------------------------------------------

def _acas(net, prop):
    return ACAS_SAMPLE / "onnx" / f"ACASXU_run2a_{net}_batch_2000.onnx", \
        ACAS_SAMPLE / "vnnlib" / f"{prop}.vnnlib"


def test_ray_domain_pool_gives_the_in_process_verdicts(local_ray):
    """Every instance of the sample is decided by input-split branch and bound (the sat one by a
    replayed counterexample): with 2 actors the verdicts are the in-process ones."""
    net = "1_2"
    from verifier.complete import verify
    from verifier.schedule.ray_bab import RayDomainPool
    exp = expected(ACAS_SAMPLE)
    with RayDomainPool(_acas(net, "prop_2")[0], actors=2) as pool:
        for prop in ("prop_2", "prop_3", "prop_4"):
            onnx, vnnlib = _acas(net, prop)
            here = verify(onnx, vnnlib, timeout=60)
            there = verify(onnx, vnnlib, timeout=60, expander=pool)
            assert here.method == there.method == "bab-input"
            assert here.status == there.status == exp[(str(onnx), str(vnnlib))], (here, there)
            if there.status == "unsat":   # every domain of the same tree was bounded
                assert there.details["domains"] > 0


@pytest.fixture(scope="module")
def pool_1_1(local_ray):
    """2 actors holding ACAS Xu 1_1 (shared by the next two tests; the kill test comes last:
    it spends the actors' one restart)."""
    from verifier.schedule.ray_bab import RayDomainPool
    with RayDomainPool(_acas("1_1", "prop_3")[0], actors=2) as pool:
        yield pool


def test_ray_domain_pool_stops_at_the_deadline_and_serves_the_next_run(pool_1_1):
    _skip_when_starved()
    from verifier.api import BoundedModel
    from verifier.complete.input_bab import input_split_bab
    from verifier.spec.vnnlib import read_vnnlib
    onnx, vnnlib = _acas("1_1", "prop_3")
    m = BoundedModel.from_onnx(onnx)
    r = read_vnnlib(vnnlib).regions[0]
    lo = torch.as_tensor(r.lower, dtype=torch.float32).reshape(m.input_shape)
    hi = torch.as_tensor(r.upper, dtype=torch.float32).reshape(m.input_shape)
    Cs = [torch.as_tensor(c.C, dtype=torch.float32) for c in r.disjuncts]
    ds = [torch.as_tensor(c.d, dtype=torch.float32) for c in r.disjuncts]
    pool = pool_1_1
    t0 = time.perf_counter()
    res = input_split_bab(m, lo, hi, Cs, ds, t0 + 0.3, expander=pool)
    assert res.status == "timeout"
    assert time.perf_counter() - t0 < 3.0
    res = input_split_bab(m, lo, hi, Cs, ds, time.perf_counter() + 60, expander=pool)
    assert res.status == "unsat"
    local = input_split_bab(m, lo, hi, Cs, ds, time.perf_counter() + 60)
    assert local.status == "unsat"


def test_ray_domain_pool_actor_killed_mid_batch_is_restarted_and_the_batch_rerun(pool_1_1):
    from verifier.api import BoundedModel
    from verifier.complete.bab import LocalExpander
    from verifier.complete.input_bab import InputProblem
    from verifier.spec.vnnlib import read_vnnlib
    onnx, vnnlib = _acas("1_1", "prop_3")
    m = BoundedModel.from_onnx(onnx)
    r = read_vnnlib(vnnlib).regions[0]
    lo = torch.as_tensor(r.lower, dtype=torch.float32)
    hi = torch.as_tensor(r.upper, dtype=torch.float32)
    # 64 sub-boxes along input 0: a batch that takes a moment
    cuts = torch.linspace(0, 1, 65)
    blo, bhi = lo.repeat(64, 1), hi.repeat(64, 1)
    blo[:, 0] = lo[0] + cuts[:-1] * (hi[0] - lo[0])
    bhi[:, 0] = lo[0] + cuts[1:] * (hi[0] - lo[0])
    blo, bhi = blo.reshape(64, *m.input_shape), bhi.reshape(64, *m.input_shape)
    prob = InputProblem([torch.as_tensor(c.C, dtype=torch.float32) for c in r.disjuncts],
                        [torch.as_tensor(c.d, dtype=torch.float32) for c in r.disjuncts],
                        (hi - lo).flatten(), "crown")
    far = time.perf_counter() + 600
    local = LocalExpander(m)
    local.start(prob)
    local.submit({"lo": blo, "hi": bhi}, 1, far, far)
    want = local.collect(far)
    pool = pool_1_1
    pool.start(prob)
    pids = pool.pids()
    pool.submit({"lo": blo, "hi": bhi}, 1, far, far)
    for pid in pids:                          # while the batch is on its way or running
        os.kill(pid, signal.SIGKILL)
    got = pool.collect(far)
    assert not set(pool.pids()) & set(pids)   # Ray restarted the actors (model reloaded)
    assert got.bounded == want.bounded == 64 and got.open == want.open
    assert (got.children is None) == (want.children is None)
    if want.children is not None:
        assert torch.equal(got.children["lo"], want.children["lo"])
        assert torch.equal(got.children["hi"], want.children["hi"])



# -- ReLU-split branch and bound on Ray actors ---------------------------------------------------

N_IN = 20   # more inputs than verify splits: ReLU-split branch and bound


def _relu_net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(N_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _vnnlib(d):
    """y <= d over the box [-0.5, 0.5]^20 (the counterexamples)."""
    lines = [f"(declare-const X_{i} Real)" for i in range(N_IN)] + ["(declare-const Y_0 Real)"]
    lines += [f"(assert (>= X_{i} -0.5))\n(assert (<= X_{i} 0.5))" for i in range(N_IN)]
    return "\n".join(lines + [f"(assert (<= Y_0 {d!r}))"]) + "\n"


@pytest.fixture(scope="module")
def relu_case(tmp_path_factory):
    """The net as ONNX, and two properties: y <= m - 0.03 and y <= m + 0.01, with m the least
    output found by sampling and PGD (so the second has a counterexample)."""
    net = _relu_net()
    d = tmp_path_factory.mktemp("relu")
    onnx = d / "net.onnx"
    torch.onnx.export(net, torch.zeros(1, N_IN), str(onnx), dynamo=False, opset_version=13)
    m = least_output(net, N_IN)
    (d / "below.vnnlib").write_text(_vnnlib(m - 0.03))
    (d / "above.vnnlib").write_text(_vnnlib(m + 0.01))
    return onnx, d / "below.vnnlib", d / "above.vnnlib"


@pytest.fixture(scope="module")
def relu_pool(local_ray, relu_case):
    """2 actors holding the ReLU net (the kill test comes last: it spends their restarts)."""
    from verifier.schedule.ray_bab import RayDomainPool
    with RayDomainPool(relu_case[0], actors=2) as pool:
        yield pool


def test_ray_domain_pool_gives_the_in_process_relu_split_verdicts(relu_case, relu_pool):
    _skip_when_starved()
    from verifier.complete import verify
    onnx, below, above = relu_case
    for vnnlib, attack, want in ((below, True, "unsat"), (above, False, "sat")):
        here = verify(onnx, vnnlib, timeout=60, attack=attack)
        there = verify(onnx, vnnlib, timeout=60, attack=attack, expander=relu_pool)
        assert here.method == there.method == "bab-relu", (here, there)
        assert here.status == there.status == want, (here, there)   # sat: replayed
        assert there.details["domains"] > 1


def _expand_locally(model, prob, cur, far):
    """The batch ``cur`` expanded in this process (what an actor must reproduce)."""
    from verifier.complete.bab import LocalExpander
    local = LocalExpander(model)
    local.start(prob)
    local.submit(cur, 1, far, far)
    return local.collect(far)


def _relu_root_batch(onnx, vnnlib, iterations):
    """The model, a ReluProblem of the property, and its root as a batch of one parent."""
    from verifier.api import BoundedModel
    from verifier.complete.relu_bab import ReluPrepared, ReluProblem
    from verifier.spec.vnnlib import read_vnnlib
    m = BoundedModel.from_onnx(onnx)
    r = read_vnnlib(vnnlib).regions[0]
    lo = torch.as_tensor(r.lower, dtype=torch.float32).reshape(m.input_shape)
    hi = torch.as_tensor(r.upper, dtype=torch.float32).reshape(m.input_shape)
    P = ReluPrepared(m, lo, hi, [torch.as_tensor(c.C, dtype=torch.float32) for c in r.disjuncts],
                     [torch.as_tensor(c.d, dtype=torch.float32) for c in r.disjuncts])
    lo_, up_, sg = P.root_domain()
    res = P.bound(lo_, up_, sg, first_split=len(P.relus), iterations=2)
    which, local = P.branch(res, sg)
    cur = {"lo": res["lo"], "up": res["up"], "sg": sg, "margin": res["margin"], "which": which,
           "local": local, "depth": torch.zeros(1, dtype=torch.long)}
    return m, ReluProblem(P.lower, P.upper, P.Cs, P.ds, P.root, iterations), cur


def test_ray_domain_pool_cancel_stops_running_relu_batches_within_a_step(relu_case, relu_pool):
    """Two batches that would optimize for about half a minute (20,000 steps, y <= m + 0.01
    is never refuted) run on both actors; after cancel both actors answer within seconds."""
    _skip_when_starved()
    onnx, _, above = relu_case
    _, prob, cur = _relu_root_batch(onnx, above, iterations=20_000)
    far = time.perf_counter() + 600
    relu_pool.start(prob)
    relu_pool.submit(cur, 1, far, far)
    relu_pool.submit(cur, 2, far, far)
    time.sleep(2.0)
    done, _ = ray.wait(list(relu_pool._pending), num_returns=2, timeout=0)
    assert not done, "the batches ended before the cancel: nothing to stop"
    t0 = time.perf_counter()
    relu_pool.cancel()
    relu_pool.pids()   # each actor's next call waits for its running batch to end
    assert time.perf_counter() - t0 < 3.0


def test_ray_domain_pool_expands_a_relu_batch_exactly_as_in_process(relu_case, relu_pool):
    """(After the cancel test: a cancel flag left set would cut this batch's optimization.)"""
    onnx, below, _ = relu_case
    m, prob, cur = _relu_root_batch(onnx, below, iterations=8)
    far = time.perf_counter() + 600
    want = _expand_locally(m, prob, cur, far)
    relu_pool.start(prob)
    relu_pool.submit(cur, 1, far, far)
    got = relu_pool.collect(far)
    assert got.bounded == want.bounded == 2 and got.candidate is None is want.candidate
    assert want.children is not None
    for key in ("margin", "which", "local", "depth"):
        assert torch.equal(got.children[key], want.children[key]), key
    for key in ("lo", "up", "sg"):
        for node, v in want.children[key].items():
            assert torch.equal(got.children[key][node], v), (key, node)


def test_ray_domain_pool_relu_actor_killed_is_rerun_then_a_second_death_is_an_error(relu_case,
                                                                                   relu_pool):
    from verifier.complete.relu_bab import relu_split_bab
    from verifier.schedule import SchedulerError
    onnx, below, _ = relu_case
    m, prob, cur = _relu_root_batch(onnx, below, iterations=300)
    far = time.perf_counter() + 600
    want = _expand_locally(m, prob, cur, far)
    relu_pool.start(prob)
    pids = relu_pool.pids()
    relu_pool.submit(cur, 1, far, far)
    for pid in pids:                     # while the batch is on its way or running
        os.kill(pid, signal.SIGKILL)
    got = relu_pool.collect(far)         # Ray restarted the actor and ran the batch again
    assert not set(relu_pool.pids()) & set(pids)
    assert got.bounded == want.bounded and torch.equal(got.children["margin"],
                                                       want.children["margin"])
    for pid in relu_pool.pids():         # the restart is spent: a second death is an error
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(SchedulerError, match="worker failed"):
        relu_split_bab(m, prob.lower, prob.upper, prob.Cs, [d for d in prob.ds],
                       time.perf_counter() + 60, expander=relu_pool)
