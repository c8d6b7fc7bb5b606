"""The frontier of input-split branch and bound: the most open domains (lowest parent margin)
are handed out first, every domain pushed comes out exactly once, above its memory cap the
newest domains go first (depth first), and in a whole run every domain handed out was the most
open one waiting."""
import time

import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.complete.bab import LocalExpander
from verifier.complete.frontier import BestFirstFrontier
from verifier.complete.input_bab import input_split_bab


def _part(ids, keys, width=3):
    """A batch of domains named by ``ids`` (kept in ``id`` and inside ``lo``/``hi``)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    lo = ids.double().unsqueeze(1).repeat(1, width)
    return {"id": ids, "lo": lo, "hi": lo + 1, "key": torch.as_tensor(keys, dtype=torch.float64)}


@pytest.mark.parametrize("seed", range(3))
def test_pop_hands_out_the_lowest_keys_waiting(seed):
    g = torch.Generator().manual_seed(seed)
    waiting = {}                                   # id -> key: the reference, kept by hand
    first = _part([0], [-float("inf")])
    f = BestFirstFrontier(first)
    waiting[0] = -float("inf")
    next_id = 1
    for step in range(40):
        if step % 3 != 2:                          # push a batch of children, keys with ties
            m = int(torch.randint(1, 30, (1,), generator=g))
            keys = torch.randint(-20, 5, (m,), generator=g).double() / 4
            ids = list(range(next_id, next_id + m))
            next_id += m
            f.push(_part(ids, keys))
            waiting.update(zip(ids, keys.tolist()))
        k = int(torch.randint(1, 25, (1,), generator=g))
        if not waiting:
            with pytest.raises(IndexError):
                f.pop(k)
            continue
        got = f.pop(k)
        got_ids = got["id"].tolist()
        assert len(got_ids) == min(k, len(waiting)) == len(set(got_ids))
        got_keys = sorted(waiting.pop(i) for i in got_ids)
        assert len(f) == len(waiting)
        if waiting:   # nothing handed out is above anything left
            assert got_keys[-1] <= min(waiting.values())
        # the rows travel together
        assert torch.equal(got["lo"][:, 0], got["id"].double())
        assert torch.equal(got["hi"], got["lo"] + 1)
        assert "key" not in got
    while len(f):
        for i in f.pop(7)["id"].tolist():
            del waiting[i]
    assert not waiting and f.lowest() == float("inf")


def test_lowest_is_the_lowest_key_waiting():
    f = BestFirstFrontier(_part([0, 1], [0.5, 0.25]))
    f.push(_part([2, 3, 4], [0.75, -1.0, 2.0]))
    assert f.lowest() == -1.0
    assert f.pop(1)["id"].tolist() == [3]
    assert f.lowest() == 0.25


def test_above_the_memory_cap_the_newest_domains_go_first():
    f = BestFirstFrontier(_part(range(10), [-5.0] * 10), max_bytes=0)   # always above the cap
    f.push(_part(range(10, 20), [9.0] * 10))
    got = f.pop(4)["id"].tolist()
    assert set(got) <= set(range(10, 20))        # the newest part, though its keys are higher
    got = f.pop(8)["id"].tolist()                 # the newest part's 6 left, then 2 older ones
    assert len(set(got) & set(range(10, 20))) == 6 and len(got) == 8
    # under the cap again: best first
    f.max_bytes = 1 << 40
    f.push(_part([20, 21], [-9.0, 100.0]))
    assert f.pop(1)["id"].tolist() == [20]


def test_a_mostly_handed_out_part_is_compacted():
    f = BestFirstFrontier(_part(range(1000), torch.arange(1000.0)))
    full = f.bytes
    f.pop(900)
    assert len(f) == 100 and f.bytes <= full // 4
    assert sorted(f.pop(1000)["id"].tolist()) == list(range(900, 1000))
    assert f.bytes == 0


def test_children_without_their_keys_are_an_error():
    f = BestFirstFrontier(_part([0], [0.0]))
    with pytest.raises(ValueError, match="no 'key'"):
        f.push({"lo": torch.zeros(2, 3), "hi": torch.ones(2, 3)})


class _Recorder(LocalExpander):
    """Records each batch handed out and each batch of children (boxes and keys)."""

    def __init__(self, model):
        super().__init__(model)
        self.events = []

    def collect(self, deadline):
        job, self._job = self._job, None
        self.events.append(("out", job[0]["lo"].clone(), job[0]["hi"].clone()))
        e = self.prepared.expand(*job)
        if e.children is not None:
            c = e.children
            self.events.append(("in", c["lo"].clone(), c["hi"].clone(), c["key"].clone()))
        return e


def _boxes(lo, hi):
    return [tuple(a.tolist()) + tuple(b.tolist()) for a, b in zip(lo.flatten(1), hi.flatten(1))]


def _replay(events, depth_first):
    """Checks each domain handed out against the domains waiting then (rebuilt from the
    events): best first, it has the lowest key; depth first, it is of the newest batch."""
    waiting, batch_of, n_out = {}, {}, 0
    for b, ev in enumerate(events):
        if ev[0] == "in":
            for box, key in zip(_boxes(ev[1], ev[2]), ev[3].tolist()):
                waiting[box], batch_of[box] = key, b
            continue
        for box in _boxes(ev[1], ev[2]):
            if not waiting:          # the root
                continue
            key = waiting.pop(box)   # KeyError: a domain never pushed, or handed out twice
            n_out += 1
            if depth_first:
                assert batch_of[box] == max(batch_of[w] for w in list(waiting) + [box])
            else:
                assert key <= min(waiting.values(), default=key)
    assert not waiting           # everything pushed was handed out (the run ended unsat)
    return n_out


@pytest.mark.parametrize("seed", [0, 2])
def test_a_run_hands_out_the_most_open_domain_first_and_bounds_the_same_domains(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    bm = BoundedModel(net, input_shape=(3,))
    lo, hi = -torch.ones(3), torch.ones(3)
    x = lo + torch.rand(100_000, 3, generator=torch.Generator().manual_seed(0)) * (hi - lo)
    with torch.no_grad():
        y = net(x)
    d = float((y[:, 0] - y[:, 1]).min()) - 0.02      # below every sampled value: provable
    args = (bm, lo, hi, [torch.tensor([[1.0, -1.0]])], [torch.tensor([d])],
            time.perf_counter() + 60)
    best, deep = _Recorder(bm), _Recorder(bm)
    a = input_split_bab(*args, batch=1, expander=best)
    b = input_split_bab(*args, batch=1, expander=deep, frontier_bytes=0)
    assert a.status == b.status == "unsat"
    assert a.domains == b.domains > 20               # the same tree, in another order
    assert _replay(best.events, depth_first=False) == a.domains - 1
    assert _replay(deep.events, depth_first=True) == b.domains - 1
