"""A file SR with SM's VHD semantics: <sr-root>/<sr-uuid>/<vdi-uuid>.vhd, snapshots, CBT logs, GC.

What SM (FileSR.py, cleanup.py, cbtutil) does, in miniature:
- snapshot/clone of a leaf L: L's file becomes a hidden base B (renamed to a new uuid); two new empty
  differencing leaves on B: one keeps L's uuid (the VM's disk), the other is the snapshot/clone.
- CBT: a `<uuid>.cbtlog` per VDI with a 64 KiB-granularity bitmap of guest writes and parent/child links;
  on snapshot the leaf's log becomes the snapshot's and the leaf starts a fresh log whose parent is the
  snapshot's. list_changed_blocks(from, to) ORs the logs after `from` up to and including `to`.
- GC (cleanup.py): deletes hidden VHDs without children, coalesces a hidden VHD into its parent when that
  parent has it as only child (then relinks its children), and leaf-coalesces a leaf into a hidden
  single-child parent (the parent takes the leaf's name). It runs only while it can take the SR's
  `running` lock (/var/lock/sm/<sr>/running by default), which is how SM's tools pause it.

Every VHD's footer uuid equals its file name's uuid (hostsim keeps them in step on rename).

QCOW2 VDIs (XCP-ng 8.3): `<uuid>.qcow2` beside the VHDs (hostsim.qcow2file), made when the SR's
`image_format` (or create's image_format=) is "qcow2"; snapshots, CBT, GC and reads work the same
way, the chain made of QCOW2 backing files (a snapshot's children name their parent by its bare
file name), coalesce done by `qemu-img commit`, relink by `qemu-img rebase -u`. A chain never
mixes formats: a snapshot's files have the format of the VDI snapshotted.
"""

import base64
import fcntl
import json
import logging
import os
import threading
import uuid as uuidlib

from agent import speedups
from hostsim import qcow2file, vhdfile
from hostsim.errors import XapiError, sr_backend_failure

log = logging.getLogger("hostsim.sm")

CBT_BLOCK = 64 * 1024
IMAGE_FORMATS = ("vhd", "qcow2")
MAX_OPEN_QCOW2 = 16  # qemu-nbd processes kept for guest I/O; the least recently used one stops


class FileSR:
    def __init__(self, sr_root, sr_uuid, lock_dir=None, listener=None):
        self.uuid = sr_uuid
        self.path = os.path.join(sr_root, sr_uuid)
        os.makedirs(self.path, exist_ok=True)
        self.lock_dir = os.path.join(lock_dir, sr_uuid) if lock_dir else None
        if self.lock_dir:
            os.makedirs(self.lock_dir, exist_ok=True)
        self.lock = threading.RLock()
        self.listener = listener
        self._files = {}
        self._gc_wake = threading.Event()
        self._gc_stop = threading.Event()
        self._gc_thread = None
        self.gc_runs = 0
        self.gc_skipped = 0
        self.image_format = "vhd"  # of new VDIs (hostsim serve --image-format)

    # -- files ---------------------------------------------------------------------------------

    def vhd_path(self, uuid):
        return os.path.join(self.path, "%s.vhd" % uuid)

    def qcow2_path(self, uuid):
        return os.path.join(self.path, "%s.qcow2" % uuid)

    def image_format_of(self, uuid):
        """ "vhd" or "qcow2": which file the VDI has (SM's FileVDI tries .vhd first)."""
        if os.path.exists(self.vhd_path(uuid)):
            return "vhd"
        if os.path.exists(self.qcow2_path(uuid)):
            return "qcow2"
        raise sr_backend_failure(46, "The VDI is not available", uuid)

    def image_path(self, uuid):
        """The VDI's file: <uuid>.vhd or <uuid>.qcow2."""
        if self.image_format_of(uuid) == "qcow2":
            return self.qcow2_path(uuid)
        return self.vhd_path(uuid)

    def cbt_path(self, uuid):
        return os.path.join(self.path, "%s.cbtlog" % uuid)

    def _file(self, uuid):
        vf = self._files.pop(uuid, None)
        if vf is None:
            if self.image_format_of(uuid) == "qcow2":
                vf = qcow2file.Qcow2File(self.qcow2_path(uuid), writable=True)
            else:
                vf = vhdfile.VhdFile(self.vhd_path(uuid), writable=True)
        self._files[uuid] = vf  # most recently used last
        open_qcow2 = [
            u for u, f in self._files.items() if isinstance(f, qcow2file.Qcow2File) and f.serving
        ]
        for u in open_qcow2[: max(0, len(open_qcow2) - MAX_OPEN_QCOW2)]:
            self._files[u].close()  # stops its qemu-nbd; reopened on next use
        return vf

    def _drop_cache(self):
        for vf in self._files.values():
            vf.close()
        self._files.clear()

    def close(self):
        self.stop_gc()
        with self.lock:
            self._drop_cache()

    def chain(self, uuid):
        """VhdFile objects of uuid's chain, leaf first."""
        with self.lock:
            out = []
            seen = set()
            cur = uuid
            while cur is not None:
                if cur in seen or len(out) > 64:
                    raise sr_backend_failure(13, "VHD chain loop", uuid)
                seen.add(cur)
                vf = self._file(cur)
                out.append(vf)
                cur = vf.parent_uuid
            return out

    def uuids(self):
        names = os.listdir(self.path)
        out = {n[:-4] for n in names if n.endswith(".vhd")}
        out.update(n[:-6] for n in names if n.endswith(".qcow2"))
        return sorted(out)

    def scan(self):
        """uuid -> (parent uuid or None, hidden) for every VHD of the SR."""
        with self.lock:
            return {u: (self._file(u).parent_uuid, self._file(u).hidden) for u in self.uuids()}

    def info(self, uuid):
        with self.lock:
            vf = self._file(uuid)
            return {
                "virtual_size": vf.size,
                "physical_utilisation": vf.physical_size(),
                "parent": vf.parent_uuid,
                "hidden": vf.hidden,
                "image_format": self.image_format_of(uuid),
            }

    # -- VDI operations ------------------------------------------------------------------------

    def create(self, size, uuid=None, block_size=2 << 20, image_format=None):
        if size <= 0:
            raise sr_backend_failure(79, "VDI Invalid size", str(size))
        size = (size + 511) // 512 * 512
        uuid = uuid or str(uuidlib.uuid4())
        kind = image_format or self.image_format
        if kind not in IMAGE_FORMATS:
            raise sr_backend_failure(
                79, "VDI Invalid image format", "%r (one of %s)" % (kind, ", ".join(IMAGE_FORMATS))
            )
        with self.lock:
            if kind == "qcow2":
                qcow2file.create(self.qcow2_path(uuid), size).close()
            else:
                vhdfile.create(self.vhd_path(uuid), size, block_size=block_size, uid=uuid).close()
        return uuid

    def snapshot(self, uuid, cbt=False):
        """SM's snapshot/clone of a leaf: returns (new leaf uuid, new hidden base uuid)."""
        with self.lock:
            leaf = self._file(uuid)
            if leaf.hidden:
                raise sr_backend_failure(82, "Failed to snapshot VDI", "VDI is hidden: " + uuid)
            base_uuid = str(uuidlib.uuid4())
            new_uuid = str(uuidlib.uuid4())
            if isinstance(leaf, qcow2file.Qcow2File):
                self._snapshot_qcow2(uuid, base_uuid, new_uuid)
                if cbt and os.path.exists(self.cbt_path(uuid)):
                    self._cbt_snapshot(uuid, new_uuid)
                return new_uuid, base_uuid
            base_path = self.vhd_path(base_uuid)
            self._drop_cache()
            os.rename(self.vhd_path(uuid), base_path)
            base = vhdfile.VhdFile(base_path, writable=True)
            try:
                base.set_uuid(base_uuid)
                base.set_hidden(True)
                base.flush()
                vhdfile.create(
                    self.vhd_path(uuid), base.size, base.block_size, uuid, parent=base
                ).close()
                vhdfile.create(
                    self.vhd_path(new_uuid), base.size, base.block_size, new_uuid, parent=base
                ).close()
            finally:
                base.close()
            if cbt and os.path.exists(self.cbt_path(uuid)):
                self._cbt_snapshot(uuid, new_uuid)
            return new_uuid, base_uuid

    def _snapshot_qcow2(self, uuid, base_uuid, new_uuid):
        """SM's qcow2 snapshot: the leaf becomes the hidden base (renamed), two new children on
        it (`qemu-img create -b <base>.qcow2 -F qcow2`), one keeping the leaf's uuid."""
        self._drop_cache()
        base_path = self.qcow2_path(base_uuid)
        os.rename(self.qcow2_path(uuid), base_path)
        qcow2file.set_hidden_flag(base_path, True)
        qcow2file.create(self.qcow2_path(uuid), parent=base_path).close()
        qcow2file.create(self.qcow2_path(new_uuid), parent=base_path).close()

    def destroy(self, uuid):
        with self.lock:
            if any(p == uuid for p, _ in self.scan().values()):
                raise sr_backend_failure(
                    24, "VDI is in use", "VHD %s still has children (a hidden base)" % uuid
                )
            self._drop_cache()
            self._unlink_image(uuid)
            if os.path.exists(self.cbt_path(uuid)):
                self._cbt_unlink(uuid)

    def data_destroy(self, uuid):
        """Delete a snapshot's data, keep its CBT log (the VDI becomes cbt_metadata)."""
        with self.lock:
            self._drop_cache()
            self._unlink_image(uuid)

    def _unlink_image(self, uuid):
        for path in (self.vhd_path(uuid), self.qcow2_path(uuid)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- guest I/O and reads -------------------------------------------------------------------

    def write(self, uuid, offset, data):
        with self.lock:
            vf = self._file(uuid)
            if vf.hidden:
                raise sr_backend_failure(82, "write to a hidden VHD", uuid)
            vf.write(offset, data)
            if os.path.exists(self.cbt_path(uuid)):
                self._cbt_mark(uuid, offset, len(data))

    def read(self, uuid, offset, length):
        with self.lock:
            files = self.chain(uuid)
            size = files[0].size
            if offset < 0 or offset + length > size:
                raise sr_backend_failure(13, "read beyond the end of the VDI", uuid)
            if isinstance(files[0], qcow2file.Qcow2File):
                return files[0].read(offset, length)  # qemu reads the backing chain
            return vhdfile.chain_read(files, offset, length, files[0].block_size)

    def allocated_blocks(self, uuid, stop_at=()):
        """Blocks allocated in uuid's chain (union of BATs), stopping before files in stop_at."""
        with self.lock:
            blocks = set()
            for vf in self.chain(uuid):
                if vf.uuid in stop_at:
                    break
                blocks.update(vf.allocated())
            return sorted(blocks)

    # -- CBT -----------------------------------------------------------------------------------

    def _cbt_load(self, uuid):
        path = self.cbt_path(uuid)
        try:
            with open(path) as f:
                log_ = json.load(f)
        except FileNotFoundError:
            raise sr_backend_failure(
                460, "Failed to calculate changed blocks for given VDIs", "no CBT log for " + uuid
            ) from None
        log_["bitmap"] = bytearray(base64.b64decode(log_["bitmap"]))
        return log_

    def _cbt_save(self, uuid, log_):
        out = dict(log_)
        out["bitmap"] = base64.b64encode(bytes(log_["bitmap"])).decode()
        tmp = self.cbt_path(uuid) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, self.cbt_path(uuid))

    def _cbt_bits(self, size):
        return (size + CBT_BLOCK - 1) // CBT_BLOCK

    def enable_cbt(self, uuid):
        with self.lock:
            size = self._file(uuid).size
            nbits = self._cbt_bits(size)
            self._cbt_save(
                uuid,
                {
                    "size": size,
                    "parent": None,
                    "child": None,
                    "consistent": True,
                    "bitmap": bytearray((nbits + 7) // 8),
                },
            )

    def disable_cbt(self, uuid):
        with self.lock:
            if os.path.exists(self.cbt_path(uuid)):
                self._cbt_unlink(uuid)

    def _cbt_mark(self, uuid, offset, length):
        log_ = self._cbt_load(uuid)
        first = offset // CBT_BLOCK
        last = (offset + length - 1) // CBT_BLOCK
        bm = log_["bitmap"]
        for i in range(first, last + 1):
            bm[i >> 3] |= 0x80 >> (i & 7)
        self._cbt_save(uuid, log_)

    def _cbt_snapshot(self, leaf, snap):
        """The leaf's log becomes the snapshot's; the leaf starts a fresh log after it."""
        os.replace(self.cbt_path(leaf), self.cbt_path(snap))
        snap_log = self._cbt_load(snap)
        if snap_log["parent"]:
            try:
                parent = self._cbt_load(snap_log["parent"])
                parent["child"] = snap
                self._cbt_save(snap_log["parent"], parent)
            except XapiError:
                pass
        snap_log["child"] = leaf
        self._cbt_save(snap, snap_log)
        nbits = self._cbt_bits(snap_log["size"])
        self._cbt_save(
            leaf,
            {
                "size": snap_log["size"],
                "parent": snap,
                "child": None,
                "consistent": True,
                "bitmap": bytearray((nbits + 7) // 8),
            },
        )

    def _cbt_unlink(self, uuid):
        """Remove a log from the CBT chain, folding its changes into its child (SM's delete)."""
        log_ = self._cbt_load(uuid)
        parent, child = log_["parent"], log_["child"]
        if child and os.path.exists(self.cbt_path(child)):
            c = self._cbt_load(child)
            c["bitmap"] = bytearray(a | b for a, b in zip(c["bitmap"], log_["bitmap"]))
            c["parent"] = parent
            self._cbt_save(child, c)
        if parent and os.path.exists(self.cbt_path(parent)):
            p = self._cbt_load(parent)
            p["child"] = child if child and os.path.exists(self.cbt_path(child)) else None
            self._cbt_save(parent, p)
        os.unlink(self.cbt_path(uuid))

    def list_changed_blocks(self, from_uuid, to_uuid):
        """Bitmap (MSB first, 1 bit per 64 KiB) of blocks written after from_uuid up to to_uuid."""
        with self.lock:
            start = self._cbt_load(from_uuid)
            nbits = self._cbt_bits(self._cbt_load(to_uuid)["size"])
            out = bytearray((nbits + 7) // 8)
            if from_uuid == to_uuid:
                return bytes(out)
            cur = start["child"]
            seen = set()
            while True:
                if cur is None or cur in seen:
                    raise sr_backend_failure(
                        460,
                        "Failed to calculate changed blocks for given VDIs",
                        "%s is not a CBT ancestor of %s" % (from_uuid, to_uuid),
                    )
                seen.add(cur)
                log_ = self._cbt_load(cur)
                bm = log_["bitmap"]
                for i in range(min(len(bm), len(out))):
                    out[i] |= bm[i]
                if cur == to_uuid:
                    return bytes(out)
                cur = log_["child"]

    # -- garbage collection / coalesce ---------------------------------------------------------

    def _try_running_lock(self):
        if not self.lock_dir:
            return None, True
        fd = os.open(os.path.join(self.lock_dir, "running"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None, False
        return fd, True

    def gc_once(self):
        """One GC pass until nothing is left to do. Returns the actions taken (for tests/logs)."""
        fd, ok = self._try_running_lock()
        if not ok:
            self.gc_skipped += 1
            log.info("SR %s: GC paused (running lock held)", self.uuid)
            return []
        actions = []
        try:
            while True:
                with self.lock:
                    action = self._gc_step()
                if action is None:
                    break
                actions.append(action)
                if self.listener is not None:
                    self.listener(action)
            self.gc_runs += 1
        finally:
            if fd is not None:
                os.close(fd)
        return actions

    def _gc_step(self):
        vdis = self.scan()
        children = {}
        for u, (p, _) in vdis.items():
            if p is not None:
                children.setdefault(p, []).append(u)
        # 1. hidden VHDs nobody uses any more
        for u, (_p, hidden) in sorted(vdis.items()):
            if hidden and not children.get(u):
                self._drop_cache()
                self._unlink_image(u)
                return ("delete", u)
        # 2. coalesce a hidden non-leaf into a parent of which it is the only child
        for u, (p, hidden) in sorted(vdis.items()):
            if (
                hidden
                and children.get(u)
                and p is not None
                and children.get(p) == [u]
                and p in vdis
            ):
                self._coalesce_into_parent(u, p, children[u])
                return ("coalesce", u, p, sorted(children[u]))
        # 3. leaf-coalesce: a leaf into its hidden parent that has it as only child
        for u, (p, hidden) in sorted(vdis.items()):
            if (
                not hidden
                and not children.get(u)
                and p is not None
                and vdis.get(p, (None, False))[1]
                and children.get(p) == [u]
            ):
                self._leaf_coalesce(u, p)
                return ("leaf-coalesce", u, p)
        return None

    def _copy_sectors(self, src, dst):
        for index in src.allocated():
            bm = src.bitmap(index)
            spb = src.spb
            nsec = min(spb, (src.size - index * src.block_size + 511) // 512)
            for start, run, is_set in speedups.bitmap_runs(bm, 0, nsec):
                if is_set:
                    data = src.read_sectors(index, start, run)
                    dst.write(index * src.block_size + start * 512, data)

    def _merge(self, src, dst):
        """src's data into its parent dst: VHD sector by sector, QCOW2 by `qemu-img commit`."""
        if isinstance(src, qcow2file.Qcow2File):
            self._drop_cache()  # no qemu-nbd may hold a file of the chain
            src.commit()
        else:
            self._copy_sectors(src, dst)
            dst.flush()

    def _coalesce_into_parent(self, u, p, kids):
        src = self._file(u)
        dst = self._file(p)
        self._merge(src, dst)
        dst = self._file(p)
        for k in kids:
            self._file(k).set_parent(dst)
            self._file(k).flush()
        self._drop_cache()
        self._unlink_image(u)

    def _leaf_coalesce(self, leaf, p):
        src = self._file(leaf)
        dst = self._file(p)
        kind = self.image_format_of(p)
        self._merge(src, dst)
        dst = self._file(p)
        dst.set_uuid(leaf)
        dst.set_hidden(False)
        dst.flush()
        self._drop_cache()
        if kind == "qcow2":
            os.replace(self.qcow2_path(p), self.qcow2_path(leaf))
        else:
            os.replace(self.vhd_path(p), self.vhd_path(leaf))

    def start_gc(self, interval):
        if self._gc_thread is not None or not interval:
            return

        def loop():
            while not self._gc_stop.is_set():
                self._gc_wake.wait(interval)
                self._gc_wake.clear()
                if self._gc_stop.is_set():
                    break
                try:
                    self.gc_once()
                except Exception:
                    log.exception("SR %s: GC pass failed", self.uuid)

        self._gc_thread = threading.Thread(target=loop, name="sm-gc " + self.uuid[:8], daemon=True)
        self._gc_thread.start()

    def kick_gc(self):
        self._gc_wake.set()

    def stop_gc(self):
        self._gc_stop.set()
        self._gc_wake.set()
        if self._gc_thread is not None:
            self._gc_thread.join(timeout=30)
            self._gc_thread = None
