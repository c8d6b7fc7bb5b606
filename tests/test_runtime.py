"""verifier.runtime.tune_allocator: takes effect on glibc, is idempotent, and cuts the page
faults of repeated CROWN calls (measured in a fresh process, before and after)."""
import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from verifier import BoundedModel, Box, margin_spec
    from verifier.runtime import tune_allocator
    if sys.argv[1] == "tuned":
        assert tune_allocator() is True and tune_allocator() is True
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 10))
    torch.manual_seed(0)
    bm = BoundedModel(net.eval(), input_shape=(3, 32, 32))
    x = torch.rand(1, 3, 32, 32)
    box = Box(x - 0.01, x + 0.01)
    bm.bounds(box, "crown", spec=margin_spec([0], 10))
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        bm.bounds(box, "crown", spec=margin_spec([0], 10))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_tune_allocator_cuts_page_faults():
    faults = {}
    for mode in ("default", "tuned"):
        r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout.split()[-1])
    assert faults["tuned"] < 0.5 * faults["default"], faults
