"""VM names where a uuid is expected: ``<name>/latest`` and ``<name>/<time>`` in ``restore``
and ``show`` (looked up in the repository: the name-label recorded in each VM's newest restore
point, so no XAPI is needed), and the XAPI lookup for ``backup vm`` (selection.resolve_vm).
"""

from __future__ import annotations

from orchestrator.cliutil import UsageError
from orchestrator.repo.errors import NotFound, RepoError


def resolve_point(repo, ident: str):
    """``repo.resolve(ident)``, where the ``<vm>`` part may also be a VM's unique
    name-label; the original RestorePointNotFound when no VM of the repository has that name,
    UsageError listing the uuids when several do."""
    catalog = repo.scan()
    try:
        return repo.resolve(ident, catalog)
    except RepoError as first:
        vm, _, when = ident.rpartition("/")
        if not vm or any(p.vm == vm for p in catalog.restore_points()):
            raise
        newest = {}
        for p in catalog.restore_points(complete=True):
            newest[p.vm] = p  # sorted by (vm, time): the last one wins
        matches = []
        for uuid, point in sorted(newest.items()):
            try:
                meta = repo.read_metadata(point).get("metadata", {})
            except (RepoError, NotFound):
                continue
            if (meta.get("vm") or {}).get("name_label") == vm:
                matches.append(uuid)
        if not matches:
            raise first from None
        if len(matches) > 1:
            raise UsageError(
                f"{len(matches)} VMs of {repo.url} are named {vm!r}: {', '.join(matches)}; "
                "give the uuid"
            ) from None
        return repo.resolve(f"{matches[0]}/{when}", catalog)
