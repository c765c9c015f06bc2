"""``fastpath repair REPO [--from OTHER]``: heal the chunks ``verify --mark`` marked damaged.

Each marked chunk (``damaged/<digest>``, :mod:`orchestrator.repo.damage`) is first read again
from REPO: a sound one (a transient fault had it marked) only loses its mark. With ``--from``, a
damaged one is fetched from the copy repository: by digest when both compute the same digests
(``ChunkCodec.same_keys``: the object is copied as is), else through the restore points both
hold (copies keep their ``<vm>/<time>`` names): the same position of the same disk's index in
OTHER gives the chunk, whose plaintext must have REPO's digest before it is re-encoded and stored.
Every chunk stored is checked against its digest; its mark is then cleared.
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cliutil import (
    CommandFailed,
    add_plaintext_argument,
    add_repo_argument,
    check_copy_ends,
    open_repo,
    passphrase_given,
)
from orchestrator.progress import Progress
from orchestrator.repo.codec import chunk_key
from orchestrator.repo.damage import clear_mark, damaged_digests
from orchestrator.repo.errors import CorruptChunk, CorruptIndex, NotFound
from orchestrator.repo.repository import Repository


def _from_points(repo: Repository, other: Repository, wanted: set[bytes]) -> dict[bytes, bytes]:
    """digest -> plaintext for ``wanted`` chunks, found at the same index positions in OTHER."""
    found: dict[bytes, bytes] = {}
    theirs = other.scan()
    for point in repo.scan().restore_points(complete=True):
        twin = theirs.points.get((point.vm, point.time))
        if twin is None or not twin.complete:
            continue
        for vdi, key in point.disks.items():
            if vdi not in twin.disks or not wanted - set(found):
                continue
            try:
                mine = repo.read_index(key)
                other_index = other.read_index(twin.disks[vdi])
            except (NotFound, CorruptIndex):
                continue
            for i, d in enumerate(mine.digests()):
                if d in wanted and d not in found and i < len(other_index):
                    try:
                        plain = other.read_chunk(other_index.get(i))
                    except (NotFound, CorruptChunk):
                        continue
                    if repo.codec.digest(plain) == d:
                        found[d] = plain
    return found


def run_repair(
    repo: Repository, other: Repository | None = None, ui: Progress | None = None
) -> dict[str, Any]:
    ui = ui or Progress("quiet")
    marked = sorted(damaged_digests(repo.backend))
    sound, healed, left = [], [], []
    with ui.task("repair", total=len(marked), unit="chunks") as task:
        damaged = []
        for d in marked:
            try:
                repo.read_chunk_object(d)
                sound.append(d)
                clear_mark(repo.backend, d)
            except (NotFound, CorruptChunk):
                damaged.append(d)
        if other is not None and damaged:
            if repo.codec.same_keys(other.codec):
                for d in damaged:
                    try:
                        obj, _plain = other.read_chunk_object(d)
                    except (NotFound, CorruptChunk):
                        continue
                    repo.codec.decode(obj, d)
                    repo.backend.put(chunk_key(d), obj)
                    healed.append(d)
            else:
                for d, plain in _from_points(repo, other, set(damaged)).items():
                    repo.backend.put(chunk_key(d), repo.codec.encode(plain, d))
                    healed.append(d)
            for d in healed:
                repo.read_chunk_object(d)  # stored and sound
                clear_mark(repo.backend, d)
        left = [d for d in damaged if d not in set(healed)]
        task.advance(len(marked))
        task.done(f"{len(healed)} healed, {len(sound)} sound, {len(left)} still damaged")
    return {
        "ok": not left,
        "repo": repo.url,
        "from": other.url if other is not None else None,
        "marked": len(marked),
        "sound": [d.hex() for d in sound],
        "healed": [d.hex() for d in healed],
        "damaged": [d.hex() for d in left],
    }


def register(registry) -> None:
    p = registry.add("repair", cmd_repair, help="heal chunks marked damaged (verify --mark)")
    add_repo_argument(p)
    p.add_argument("--from", dest="source", metavar="REPO", help="a copy repository to heal from")
    add_plaintext_argument(p)
    p.set_defaults(_render=_render)


def cmd_repair(args: argparse.Namespace, ui: Progress):
    shared = bool(args.source)  # one --passphrase-file for REPO and the copy
    with open_repo(args, shared_passphrase=shared) as repo:
        if args.source:
            with open_repo(args, args.source, shared_passphrase=True) as other:
                # chunks flow from the copy into REPO
                check_copy_ends(
                    other, repo, allow_plaintext=args.allow_plaintext,
                    passphrase=passphrase_given(args),
                )  # fmt: skip
                result = run_repair(repo, other, ui)
        else:
            result = run_repair(repo, None, ui)
    if not result["ok"]:
        raise CommandFailed(
            f"{len(result['damaged'])} chunk(s) still damaged"
            + ("" if args.source else " (give --from a copy, or re-run a backup)"),
            result,
        )
    return result


def _render(r: dict[str, Any]) -> str:
    lines = [f"still damaged {d}" for d in r["damaged"]]
    lines.append(
        f"{len(r['healed'])} chunk(s) healed, {len(r['sound'])} sound again, "
        f"{len(r['damaged'])} still damaged (of {r['marked']} marked)"
    )
    return "\n".join(lines)


__all__ = ["run_repair"]
