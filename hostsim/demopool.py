"""The demo pool `hostsim serve` builds: a template with an OS-like disk and VMs fast-cloned from
it, each with its own writes; in a pool of several hosts, the template copied to every SR and the
VMs spread over the hosts and SRs (see build_demo)."""

import shutil

NULL_REF = "OpaqueRef:NULL"


def build_demo(pool, vms, disk_size, seed=0, cbt=True):
    """A template with an OS-like disk and `vms` VMs fast-cloned from it, each with its own writes.

    In a pool of several hosts the template is copied to every SR (as an image imported on each)
    and the VMs are spread: VM i runs on host i mod N, with its disk on that host's local SR for
    the first N VMs, on the shared SR for the next N, and so on alternately."""
    from hostsim import guest

    api, st = pool.api, pool.api.store
    tpl = pool.create_vm("debian-12-template", [disk_size], template=True)
    guest.fill_template(pool, pool.vm_vdis(tpl)[0], seed=seed)
    n = len(pool.hosts)
    placement = []  # (host, SR ref) of each VM
    for i in range(vms):
        host = pool.hosts[i % n]
        placement.append((host, host.sr_ref if n == 1 or (i // n) % 2 == 0 else pool.shared[2]))
    templates = {pool.sr_ref: tpl}
    for _host, sr_ref in placement:  # copies first: a clone turns the template into a child
        if sr_ref not in templates:
            templates[sr_ref] = copy_template(pool, tpl, sr_ref)
    out = []
    prev = None
    for i, (host, sr_ref) in enumerate(placement):
        vm = api.vm__clone(templates[sr_ref], "vm%d" % (i + 1))
        st.update("VM", vm, is_a_template=False, affinity=host.ref if n > 1 else NULL_REF)
        vdi = pool.vm_vdis(vm)[0]
        st.update("VDI", vdi, name_label="vm%d disk 0" % (i + 1))
        guest.guest_write(pool, vdi, "mixed", count=8, length=256 << 10, seed=seed * 1000 + i + 1)
        if prev is not None:  # files copied between VMs of one template
            guest.guest_write(
                pool, vdi, "copy", count=2, length=128 << 10, seed=seed * 1000 + 77, source_vdi=prev
            )
        if cbt:
            api.vdi__enable_cbt(vdi)
        api.vm__start(vm, False, False)
        prev = vdi
        out.append(vm)
    return tpl, out


def copy_template(pool, tpl, sr_ref):
    """The template's disk copied as a new VDI onto another SR, under a new template VM."""
    from hostsim import vhdfile
    from hostsim.store import new_uuid

    api, st = pool.api, pool.api.store
    src_vdi = pool.vm_vdis(tpl)[0]
    src = api._vdi_backend(src_vdi)
    dst = api.sr_backend(sr_ref)
    uuid = new_uuid()
    with src.lock:
        shutil.copyfile(src.vhd_path(st.field("VDI", src_vdi, "uuid")), dst.vhd_path(uuid))
    vf = vhdfile.VhdFile(dst.vhd_path(uuid), writable=True)
    try:
        vf.set_uuid(uuid)
        vf.flush()
    finally:
        vf.close()
    label = "%s (%s)" % (st.field("VM", tpl, "name_label"), st.field("SR", sr_ref, "name_label"))
    vm = pool.create_vm(label, [], template=True)
    vdi = api.introduce_vdi(sr_ref, uuid, name_label="%s disk 0" % label)
    api._new_vbd(vm, vdi, "0", "RW", True)
    return vm
