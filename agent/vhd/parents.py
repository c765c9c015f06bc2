"""Finding and opening the parent of a differencing VHD.

What lives here: default_resolve_parent (the parent locators, relative to the child's directory
first, then the parent's unicode name beside the child) and open_parent (open what the resolver
found and check it against the child: a VHD with the uuid the child's header names, or the raw file
under a null parent uuid). agent.vhd.chain.open_chain walks a leaf's ancestry with them.
"""

import os
import stat

from agent.vhd.errors import ChainError, VhdError
from agent.vhd.file import RawFile, VhdFile, open_level


def default_resolve_parent(child, locators):
    """Find the parent file of `child` from its locators (relative to the child's directory first).

    Returns a path, or None. Tries the W2ru (relative), W2ku, MacX locators in that order, then the
    parent's unicode name beside the child (XCP-ng file SRs name files <uuid>.vhd).
    """
    base = os.path.dirname(os.path.abspath(child.path))
    order = {"W2ru": 0, "W2ku": 1, "MacX": 2}
    candidates = []
    for _code, path in sorted(locators, key=lambda cp: order.get(cp[0], 9)):
        if os.path.isabs(path):
            candidates.append(path)
            candidates.append(os.path.join(base, os.path.basename(path)))
        else:
            candidates.append(os.path.normpath(os.path.join(base, path)))
    name = child.header.parent_name if child.header is not None else ""
    if name and "/" not in name and "\\" not in name:
        candidates.append(os.path.join(base, name))
    for c in candidates:
        try:
            mode = os.stat(c).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            return c
    return None


def open_parent(child, resolve_parent, raw_parent=None):
    """The opened parent level of differencing level `child`, checked against the child's header.

    resolve_parent(child, locators) -> a path, an opened level or None (see open_chain). raw_parent:
    the raw file to use when the child's parent uuid is null (LVM `LV-` parents). Raises ChainError
    naming the child when the parent is missing, unreadable, not a VHD or has another uuid.
    """
    locators = child.parent_locators()
    null_parent = child.parent_uuid.int == 0
    if null_parent and raw_parent is not None:
        return RawFile.open(raw_parent)
    found = resolve_parent(child, locators)
    if found is None:
        raise ChainError(
            child.path,
            "parent %s (%s) not found; locators: %s"
            % (
                child.parent_uuid,
                child.header.parent_name,
                ", ".join("%s=%s" % cp for cp in locators) or "none",
            ),
            "parent locator",
        )
    if isinstance(found, (VhdFile, RawFile)):
        parent = found
    else:
        try:
            parent = RawFile.open(found) if null_parent else open_level(found, allow_raw=False)
        except OSError as exc:
            raise ChainError(
                child.path, "cannot open parent %s: %s" % (found, exc), "parent locator"
            ) from exc
        except VhdError as exc:
            raise ChainError(
                child.path, "parent %s is not a usable VHD: %s" % (found, exc), "parent locator"
            ) from exc
    if null_parent:
        return parent
    if not parent.is_vhd:
        parent.close()
        raise ChainError(
            child.path,
            "parent %s is not a VHD but the parent uuid is %s" % (parent.path, child.parent_uuid),
            "parent_uuid",
        )
    if parent.uuid != child.parent_uuid:
        where = parent.path
        parent.close()
        raise ChainError(
            child.path,
            "parent %s has uuid %s, the header expects %s"
            % (where, parent.uuid, child.parent_uuid),
            "parent_uuid",
        )
    return parent
