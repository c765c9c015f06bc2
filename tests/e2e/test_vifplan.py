"""orchestrator.jobs.vifplan without a pool: parsing --network, mapping rules, reasons."""

import pytest

from orchestrator.jobs.vifplan import parse_network_map, plan_vifs, vif_create_record

NETS = {
    "OpaqueRef:a": {"uuid": "ua", "name_label": "LAN", "MTU": "1500"},
    "OpaqueRef:b": {"uuid": "ub", "name_label": "twin"},
    "OpaqueRef:c": {"uuid": "uc", "name_label": "twin"},
}


def vif(dev, uuid, name, mac="02:00:00:00:00:01"):
    return {"device": dev, "network_uuid": uuid, "network_name_label": name, "MAC": mac}


def test_parse():
    assert parse_network_map(["a=b", " c = d "]) == {"a": "b", "c": "d"}
    for bad in (["a"], ["=b"], ["a="], ["a=b", "a=c"]):
        with pytest.raises(ValueError):
            parse_network_map(bad)


def test_mapping_rules():
    vifs = [
        vif("0", "ua", "whatever"),  # same uuid
        vif("1", "old", "LAN"),  # same name-label
        vif("2", "old2", "twin"),  # ambiguous name
        vif("3", "old3", "gone"),  # unknown
        vif("4", "old4", "mapped"),  # --network by name-label, to a uuid
    ]
    plan, unmapped, unused = plan_vifs(vifs, NETS, {"mapped": "ub", "nothing": "ua"})
    assert [(p["device"], p["network"]) for p in plan] == [
        ("0", "OpaqueRef:a"),
        ("1", "OpaqueRef:a"),
        ("4", "OpaqueRef:b"),
    ]
    assert all(p["MAC"] == "" for p in plan)  # new MACs unless --keep-macs
    reasons = {u["device"]: u["reason"] for u in unmapped}
    assert "2 networks" in reasons["2"] and "no network 'gone'" in reasons["3"]
    assert "--network gone=NEW" in reasons["3"]
    assert unused == ["nothing"]
    kept, _, _ = plan_vifs(vifs[:1], NETS, {}, keep_macs=True)
    assert kept[0]["MAC"] == "02:00:00:00:00:01"
    rec = vif_create_record("OpaqueRef:vm", kept[0])
    assert rec["VM"] == "OpaqueRef:vm" and rec["network"] == "OpaqueRef:a" and rec["MTU"] == "1500"
