"""Property test of the writer: random chains of full and incremental backups (with resizes,
zero chunks, repeated content) against a bytearray model; every restore point stays intact."""

from __future__ import annotations

import tempfile
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.jobs.verify import run_check
from orchestrator.repo.codec import CHUNK_SIZE, chunk_key
from orchestrator.repo.repository import Repository
from tests.repo_ops.helpers import chunk_bytes

SMALL = 4096  # tail sizes stay small to keep the test fast

generation = st.fixed_dictionaries(
    {
        "full": st.booleans(),
        "chunks": st.integers(1, 4),  # full 2 MiB chunks
        "tail": st.sampled_from([0, SMALL, 512]),
        "writes": st.lists(
            st.tuples(st.integers(0, 4), st.sampled_from(["zero", "a", "b", "c", "d"])),
            max_size=4,
        ),
    }
)


def content(kind: str, length: int) -> bytes:
    if kind == "zero":
        return bytes(length)
    return chunk_bytes(ord(kind), length)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(generation, min_size=1, max_size=4))
def test_chains_of_backups_match_the_model(gens):
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repository.init(f"{tmp}/r")
        vm = str(uuid.UUID(int=42))
        vdi = vm
        model = bytearray()
        base = None
        snapshots = []
        for g in gens:
            size = g["chunks"] * CHUNK_SIZE + g["tail"]
            old_size = len(model)
            model = model[:size] + bytearray(max(0, size - len(model)))
            count = -(-size // CHUNK_SIZE)
            changed = set()
            for i, kind in g["writes"]:
                if i >= count:
                    continue
                length = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
                model[i * CHUNK_SIZE : i * CHUNK_SIZE + length] = content(kind, length)
                changed.add(i)
            # a resize changes the last chunks' lengths: the job would re-read those
            if size != old_size:
                changed.update(range(min(old_size, size) // CHUNK_SIZE, count))
            full = g["full"] or base is None
            with repo.begin_backup(vm) as s:
                w = s.disk_writer(vdi, vdi, size, base=None if full else base)
                for i in range(count) if full else sorted(changed):
                    chunk = bytes(model[i * CHUNK_SIZE : min(size, (i + 1) * CHUNK_SIZE)])
                    w.put_chunk(i, chunk)
                base = w.commit()
                s.commit()
            snapshots.append((base, bytes(model)))
        for key, expected in snapshots:
            got = b"".join(repo.iter_disk(repo.read_index(key)))
            assert got == expected
        assert run_check(repo)["ok"]
        # exactly one object per distinct non-zero chunk content; zero chunks never stored
        distinct = set()
        for _, data in snapshots:
            for off in range(0, len(data), CHUNK_SIZE):
                piece = data[off : off + CHUNK_SIZE]
                if any(piece):
                    distinct.add(piece)
        stored = {i.key for i in repo.backend.list("chunks/")}
        assert stored == {chunk_key(repo.codec.digest(p)) for p in distinct}
        repo.close()
