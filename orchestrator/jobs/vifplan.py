"""A VM's network interfaces in a restore point, and how ``restore --new-vm`` makes them again.

- ``backup vm`` stores ``read_vifs(x, vm_ref)`` as ``metadata.vifs``: per VIF its device, MAC,
  MTU, locking mode and its network's uuid and name-label (VIF_KEPT_FIELDS).
- ``restore --new-vm`` maps each VIF to a network of the target pool (``plan_vifs``): a
  ``--network OLD=NEW`` mapping first (OLD: the backed-up network's uuid or name-label; NEW: a
  target network's uuid or unique name-label), else the same network uuid, else the only network
  with the same name-label. A VIF that cannot be mapped is not created and is reported with the
  reason; ``--keep-macs`` keeps the MAC addresses (else XAPI makes new ones: a copy running next
  to its original must not share its MACs).

Pure functions but ``read_vifs`` (which reads through the XenAPI session it is given).
"""

from __future__ import annotations

from typing import Any

VIF_KEPT_FIELDS = ("device", "MAC", "MTU", "locking_mode")


def read_vifs(x, vm_ref: str) -> list[dict[str, Any]]:
    """The VM's VIFs as a restore point keeps them, ordered by device."""
    out = []
    for vif in x.VM.get_VIFs(vm_ref):
        try:
            rec = x.VIF.get_record(vif)
        except Exception:  # unplugged and destroyed since VM.get_VIFs: not part of the VM
            continue
        entry = {k: rec[k] for k in VIF_KEPT_FIELDS if k in rec}
        try:
            net = x.network.get_record(rec["network"])
            entry["network_uuid"] = net.get("uuid")
            entry["network_name_label"] = net.get("name_label")
        except Exception:  # a VIF on a network that vanished: keep what there is
            entry["network_uuid"] = None
            entry["network_name_label"] = None
        out.append(entry)
    return sorted(
        out, key=lambda e: (0, int(e["device"])) if str(e.get("device")).isdigit() else (1, 0)
    )


def parse_network_map(items: list[str] | None) -> dict[str, str]:
    """``["OLD=NEW", ...]`` -> {OLD: NEW}; ValueError naming a bad item."""
    mapping: dict[str, str] = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"--network {item!r}: expected OLD=NEW (network uuid or name-label)")
        if old.strip() in mapping:
            raise ValueError(f"--network: {old.strip()!r} mapped twice")
        mapping[old.strip()] = new.strip()
    return mapping


def _find(networks: dict[str, dict], name: str) -> tuple[str | None, str | None]:
    """(ref, None) of the target network with uuid or unique name-label ``name``; else
    (None, why)."""
    for ref, rec in networks.items():
        if rec.get("uuid") == name:
            return ref, None
    named = [ref for ref, rec in networks.items() if rec.get("name_label") == name]
    if len(named) == 1:
        return named[0], None
    if named:
        return None, f"{len(named)} networks of the target pool are named {name!r}: give its uuid"
    return None, f"no network {name!r} in the target pool"


def plan_vifs(
    vifs: list[dict[str, Any]],
    networks: dict[str, dict],
    mapping: dict[str, str],
    keep_macs: bool = False,
) -> tuple[list[dict], list[dict], list[str]]:
    """(VIFs to create, VIFs not mapped with the reason, mappings that matched no VIF).

    ``networks``: the target pool's ``network.get_all_records()``."""
    plan, unmapped = [], []
    used: set[str] = set()
    for vif in vifs:
        old_uuid, old_name = vif.get("network_uuid"), vif.get("network_name_label")
        label = f"VIF {vif.get('device')} on network {old_name!r} ({old_uuid})"
        key = old_uuid if old_uuid in mapping else old_name if old_name in mapping else None
        if key is not None:
            used.add(key)
            ref, why = _find(networks, mapping[key])
            if ref is None:
                why = f"--network {key}={mapping[key]}: {why}"
        else:
            ref, why = None, None
            if old_uuid and any(r.get("uuid") == old_uuid for r in networks.values()):
                ref, why = _find(networks, old_uuid)
            elif old_name:
                ref, why = _find(networks, old_name)
                if ref is None:
                    why = f"{why}: map it with --network {old_name}=NEW"
            else:
                why = "the backup does not name its network: map it with --network"
        if ref is None:
            unmapped.append({**vif, "vif": label, "reason": why})
            continue
        plan.append(
            {
                "device": str(vif.get("device")),
                "network": ref,
                "network_uuid": networks[ref].get("uuid"),
                "network_name_label": networks[ref].get("name_label"),
                "MAC": str(vif.get("MAC") or "") if keep_macs else "",
                "MTU": str(vif.get("MTU") or networks[ref].get("MTU") or 1500),
                "locking_mode": vif.get("locking_mode") or "network_default",
                "from_network": old_uuid,
            }
        )
    unused = sorted(k for k in mapping if k not in used)
    return plan, unmapped, unused


def vif_create_record(vm_ref: str, p: dict[str, Any]) -> dict[str, Any]:
    """VIF.create's record for a ``plan_vifs`` entry (MAC ``""``: XAPI makes one)."""
    return {
        "device": p["device"],
        "network": p["network"],
        "VM": vm_ref,
        "MAC": p["MAC"],
        "MTU": p["MTU"],
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "locking_mode": p["locking_mode"],
    }
