"""The simulated host `fastpath bench` measures against (run as its own process).

    python -m orchestrator.benchcmd.hostpool --root DIR --size SIZE [--seed N]

Built from hostsim's own pieces (``hostsim.host.Pool``, ``hostsim.guest`` data generators,
``hostsim.cli.start_agent``/``configure_plugin``), so XAPI, ``export_raw_vdi``, the xapi-nbd
endpoint, the plugin and the agent are exactly what ``hostsim serve`` runs; only the disks differ:

- VM ``bench-flat``: one dynamic VHD (no parent) filled like an installed OS. ``--data guest``
  (default): ``guest.fill_template``: 60 % of the disk written in 64 KiB..256 KiB pieces, 30 %
  text lines, 35 % binary records / code-like bytes, 10 % incompressible random bytes, 10 % zero
  runs, 15 % holes never written. ``--data usr``: orchestrator/benchcmd/usrdisk.py's disk (also
  bench/backup.py's), an ext4 file system made with ``mkfs.ext4 -d`` from real /usr files filling
  about 45 % of the disk.
- VM ``bench-chain3``: the same kind of disk, then two VDI snapshots with guest writes after each
  (``guest.guest_write`` "mixed", ~10 % of the disk each), so the VM's disk is a leaf over two
  hidden parents: a 3-deep VHD chain (the snapshots' own empty leaves are kept).

SM's GC is off (nothing coalesces the chains during the run). The agent runs without TLS on
loopback (what is measured is the serving path, not OpenSSL). Once everything answers, writes
DIR/hostsim.json in ``hostsim serve``'s format plus a ``bench`` section naming each disk's VHD
files (leaf first) and its allocated bytes, so ``hostsim write --root DIR`` and
``fastpath backup vm --hostsim DIR`` work against it unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

BLOCK = 2 << 20


def build(pool, size: int, seed: int, data: str = "guest", work: str = "") -> dict:
    from hostsim import guest

    api, st = pool.api, pool.api.store
    out = {}
    if data == "usr":
        # the disk of bench/backup.py too: an ext4 file system (mkfs.ext4 -d) of real /usr files
        from orchestrator.benchcmd.usrdisk import build_disk, install_in_pool

        raw, _staged = build_disk(work, size)
        vms = []
        for name in ("bench-flat", "bench-chain3"):
            vm = install_in_pool(pool, raw, size, os.path.join(work, name + ".vhd"))[0]
            os.unlink(os.path.join(work, name + ".vhd"))
            st.update("VM", vm, name_label=name)
            vms.append(vm)
        os.unlink(raw)
        flat, chain = vms
    else:
        flat = pool.create_vm("bench-flat", [size])
        guest.fill_template(pool, pool.vm_vdis(flat)[0], seed=seed)
        chain = pool.create_vm("bench-chain3", [size])
        guest.fill_template(pool, pool.vm_vdis(chain)[0], seed=seed + 1)
    out["flat"] = flat
    vdi = pool.vm_vdis(chain)[0]
    count = max(1, size // 10 // (256 << 10))
    for level in (1, 2):
        snap = api.vdi__snapshot(vdi, {})
        st.update("VDI", snap, name_label="bench-chain3 level %d" % level)
        guest.guest_write(pool, vdi, "mixed", count=count, length=256 << 10, seed=seed + 10 + level)
    out["chain3"] = chain
    for vm in out.values():
        for v in pool.vm_vdis(vm):
            api.vdi__enable_cbt(v)
    return out


def describe(pool, vms: dict) -> dict:
    st = pool.api.store
    disks = {}
    for kind, vm in vms.items():
        vdi = pool.vm_vdis(vm)[0]
        uuid = st.field("VDI", vdi, "uuid")
        chain = pool.sr.chain(uuid)
        blocks = pool.sr.allocated_blocks(uuid)
        size = st.field("VDI", vdi, "virtual_size")
        disks[kind] = {
            "vm": st.field("VM", vm, "uuid"),
            "vm_name": st.field("VM", vm, "name_label"),
            "vdi": uuid,
            "size": size,
            "files": [pool.sr.vhd_path(vf.uuid) for vf in chain],
            "depth": len(chain),
            "allocated_blocks": len(blocks),
            "allocated_bytes": sum(min(BLOCK, size - b * BLOCK) for b in blocks),
        }
    return disks


def main(argv: list[str] | None = None) -> int:
    from hostsim.certs import fingerprint
    from hostsim.cli import _check_xapi, _write_json, configure_plugin, parse_size, start_agent
    from hostsim.host import Pool

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=("guest", "usr"), default="guest")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    size = parse_size(args.size)
    size -= size % BLOCK
    pool = Pool(root, gc_interval=0)
    work = os.path.join(root, "build")
    os.makedirs(work, exist_ok=True)
    vms = build(pool, size, args.seed, args.data, work)
    url = pool.start(listen=("127.0.0.1", 0), tls=False, nbd_listen=("127.0.0.1", 0))
    from agent.signalstop import SignalStop

    stop = SignalStop()  # a threading.Event set from a handler can deadlock (agent/signalstop.py)
    stop.install(signal.SIGTERM, signal.SIGINT)
    agent_args = argparse.Namespace(
        agent_nbd_listen="127.0.0.1:0", agent_http_listen="127.0.0.1:0", agent_tls="off"
    )
    agent_proc = None
    state = os.path.join(root, "hostsim.json")
    try:
        agent_proc, agent_info = start_agent(pool, root, agent_args)
        configure_plugin(pool, root, agent_info)
        _check_xapi(url, "root", "hostsim")
        st = pool.api.store
        info = {
            "pid": os.getpid(),
            "xapi": {
                "url": url,
                "user": "root",
                "password": "hostsim",
                "fingerprint": None,
                "cafile": pool.cert_path,
            },
            "xapi_fingerprint": fingerprint(pool.cert_pem),
            "pool": st.field("pool", pool.pool_ref, "uuid"),
            "host": st.field("host", pool.host_ref, "uuid"),
            "sr": {"uuid": pool.sr_uuid, "root": pool.sr_root, "path": pool.sr.path},
            "sm_lock_dir": pool.lock_dir,
            "xapi_nbd": {"host": pool.address, "port": pool.nbd.port},
            "agent": dict(agent_info, pid=agent_proc.pid),
            "vms": [
                {
                    "name": st.field("VM", vm, "name_label"),
                    "uuid": st.field("VM", vm, "uuid"),
                    "vdis": [st.field("VDI", v, "uuid") for v in pool.vm_vdis(vm)],
                }
                for vm in vms.values()
            ],
            "bench": describe(pool, vms),
        }
        _write_json(state, info)
        print(json.dumps({"ready": state}), flush=True)
        while not stop.wait(0.5):
            if agent_proc.poll() is not None:
                print("the agent exited with %s" % agent_proc.returncode, file=sys.stderr)
                return 1
        return 0
    finally:
        if agent_proc is not None and agent_proc.poll() is None:
            agent_proc.terminate()
            try:
                agent_proc.wait(15)
            except Exception:
                agent_proc.kill()
                agent_proc.wait(5)
        pool.stop()
        if os.path.exists(state):
            os.unlink(state)


if __name__ == "__main__":
    sys.exit(main())
