"""Sans-IO parts of the issue-13 bounds: windowed_runs (agent.export), block_status_descriptors
and the advertised preferred block size (agent.nbd.protocol)."""

import random
import struct

import pytest

from agent.export import windowed_runs
from agent.nbd import protocol as p
from agent.nbd import wire as w
from tests.nbd.test_protocol import events, go_data, negotiated, opt, parse_option_replies

MiB = 1 << 20


def model_fetch(bits, unit):
    """A fetch over a disk of len(bits) units of `unit` bytes whose unit i has value bits[i];
    records the length of every call."""
    calls = []

    def fetch(offset, length):
        calls.append(length)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            i = pos // unit
            nxt = min(end, (i + 1) * unit)
            if out and out[-1][2] == bits[i]:
                out[-1] = (out[-1][0], out[-1][1] + nxt - pos, bits[i])
            else:
                out.append((pos, nxt - pos, bits[i]))
            pos = nxt
        return out

    return fetch, calls


@pytest.mark.parametrize("seed", range(6))
def test_windowed_runs_equal_one_big_fetch(seed):
    rnd = random.Random(seed)
    unit = 4096
    n = 3000
    # long sparse stretches and fragmented ones, so the window grows and shrinks
    bits = []
    while len(bits) < n:
        if rnd.random() < 0.5:
            bits += [rnd.random() < 0.5] * rnd.randrange(1, 2000)
        else:
            bits += [rnd.random() < 0.5 for _ in range(rnd.randrange(1, 300))]
    bits = bits[:n]
    fetch, calls = model_fetch(bits, unit)
    offset = rnd.randrange(0, 100) * 512
    length = n * unit - offset - rnd.randrange(0, 100)
    want = fetch(offset, length)
    del calls[:]
    got = list(windowed_runs(fetch, offset, length, min_window=64 * 1024, max_window=1 * MiB))
    assert got == want
    assert max(calls) <= 1 * MiB  # no window beyond the bound


def test_windowed_runs_is_lazy():
    fetch, calls = model_fetch([i % 2 == 0 for i in range(10000)], 512)
    it = windowed_runs(fetch, 0, 10000 * 512, min_window=4096, max_window=8192)
    next(it)
    assert len(calls) == 1


def test_block_status_descriptors_cap_merge_and_req_one():
    runs = [(i * 512, 512, i % 2) for i in range(100)]

    def flags(run):
        return 3 if run[2] else 0

    assert p.block_status_descriptors(iter(runs), flags, 10) == [(512, 0), (512, 3)] * 5
    assert p.block_status_descriptors(iter(runs), flags, 10, req_one=True) == [(512, 0)]
    same = [(0, 512, 1), (512, 512, 1), (1024, 512, 0)]
    # equal flags merge even past the cap; the next different run stops the reply
    assert p.block_status_descriptors(iter(same), flags, 1) == [(1024, 3)]
    consumed = []

    def gen():
        for r in runs:
            consumed.append(r)
            yield r

    p.block_status_descriptors(gen(), flags, 4)
    assert len(consumed) == 5  # stops right after the cap: the rest is never produced


@pytest.mark.parametrize(
    "block_size, preferred",
    [
        (2 * MiB, 2 * MiB),
        (64 * 1024, 64 * 1024),
        (None, 2 * MiB),
        (256 * MiB, 32 * MiB),
        (100, 512),
    ],
)
def test_go_advertises_the_exports_block_size(block_size, preferred):
    conn = negotiated()
    events(conn, opt(w.OPT_STRUCTURED_REPLY))
    events(conn, opt(w.OPT_GO, go_data("tkt", [w.INFO_BLOCK_SIZE])))
    replies = parse_option_replies(conn.accept_export(8 * MiB, None, block_size))
    assert replies[1] == (7, 3, struct.pack(">HIII", 3, 1, preferred, 32 * MiB))
