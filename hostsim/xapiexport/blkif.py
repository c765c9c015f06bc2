"""The block path between vhd-tool and tapdisk: request limits of blktap, and hostsim's wire codec.

On a real host vhd-tool reads `/dev/xen/blktap-2/tapdevN`; the blktap kernel driver turns each read
into block requests, puts them on a shared ring and tapdisk answers them. What hostsim keeps of that
(no I/O in this module):

- A request carries at most BLKTAP_SEGMENT_MAX = 11 segments of one page each: the driver sets
  `blk_queue_max_segments(rq, BLKTAP_SEGMENT_MAX)`, `blk_queue_max_segment_size(rq, PAGE_SIZE)` and
  `blk_queue_segment_boundary(rq, PAGE_SIZE - 1)` ("Ensure a merged request will fit in a single I/O
  ring slot"). Source: xapi-project/blktap-dkms `device.c` (blktap_device_configure) and
  `linux-blktap.h` (`#define BLKTAP_SEGMENT_MAX 11`). So a request is at most 11 pages = 44 KiB and
  never crosses more than 11 pages of the reader's buffer.
- At most BLKTAP_RING_SIZE requests are in flight: the ring is one page (`BLKTAP_RING_SIZE` =
  `__RD32((BLKTAP_PAGE_SIZE - offsetof(sring, ring)) / sizeof(ring entry))` in
  xapi-project/blktap-dkms `linux-blktap.h`): (4096 - 64) / 112 = 36, rounded down to a power of two
  = 32 (a 112-byte `blktap_ring_request`: op, nr_segments, id, sector, 11 segments of 8 bytes). The same
  figures ("32 requests, 11 pages per request") are in gagomes/blog
  `_posts/2013-03-03-notes-on-blktap.md`. When the ring is full the driver stops the queue
  (`blk_stop_queue` on -EBUSY in blktap_device_run_queue, device.c) until tapdisk answers.

- Data pages: each ring slot (`usr_idx`) owns BLKTAP_SEGMENT_MAX pages mapped into tapdisk
  (`MMAP_VADDR(ring->user_vstart, request->usr_idx, seg)`, blktap-dkms `ring.c`); tapdisk reads the
  VHD straight into them, and on completion the driver copies them into the reader's pages
  (`blktap_request_bounce`: `memcpy(s, p, sg->length)` for a read, blktap-dkms `request.c`, called
  from `blktap_ring_unmap_request`). One copy between tapdisk and the reader.

hostsim's stand-in: the data area is a shared memory file (memfd) of BLKTAP_RING_SIZE slots of
MAX_REQUEST_BYTES, mapped by both processes; tapdisk reads into the request's slot, and the reader
copies the slot into its buffer (the bounce). Requests and responses go over a unix stream socket:
  request  REQ = id u64, slot u32, first sector u64, sector count u32 (reads only)
  response RSP = id u64, status i32 (0 or -errno); the data is in the slot.
Responses may come back in any order (tapdisk completes aio out of order); the id says which.
"""

import errno
import struct

SECTOR = 512
PAGE_SIZE = 4096
BLKTAP_SEGMENT_MAX = 11
BLKTAP_RING_SIZE = 32
MAX_REQUEST_BYTES = BLKTAP_SEGMENT_MAX * PAGE_SIZE  # 44 KiB
MAX_REQUEST_SECTORS = MAX_REQUEST_BYTES // SECTOR  # 88

RING_DATA_BYTES = BLKTAP_RING_SIZE * MAX_REQUEST_BYTES  # 1408 KiB

REQ = struct.Struct("!QIQI")
RSP = struct.Struct("!Qi")


class RingError(Exception):
    """The other end broke the protocol or went away (ends the whole transfer)."""


def split_read(offset, length, buf_offset=0):
    """[(device offset, length, buffer offset)]: how the block layer cuts one read of `length` bytes at
    device `offset` into blktap requests, the data landing at `buf_offset` of a page-aligned buffer.

    Each request spans at most BLKTAP_SEGMENT_MAX pages of the buffer (one segment per page, segments
    end at page boundaries), so with a page-aligned buffer a 2 MiB read is 46 requests of 44 KiB and
    one of 24 KiB. Offsets and lengths are whole sectors (the device's logical block size)."""
    if offset % SECTOR or length % SECTOR or buf_offset % SECTOR:
        raise ValueError("reads of a block device are whole sectors")
    out = []
    pos = 0
    while pos < length:
        b = buf_offset + pos
        page_end = (b // PAGE_SIZE + BLKTAP_SEGMENT_MAX) * PAGE_SIZE  # end of the 11th page touched
        n = min(length - pos, page_end - b)
        out.append((offset + pos, n, b))
        pos += n
    return out


def slot_range(slot):
    """Byte range of a ring slot's pages in the shared data area."""
    return slot * MAX_REQUEST_BYTES, (slot + 1) * MAX_REQUEST_BYTES


def check_request(first, count, size_sectors, slot=0):
    """0 if tapdisk can serve sectors [first, first + count) into ring slot `slot`, else a negative
    errno (the request fails, the ring stays up: like a blkif response with BLKTAP_RSP_ERROR)."""
    if count <= 0 or count > MAX_REQUEST_SECTORS or not 0 <= slot < BLKTAP_RING_SIZE:
        return -errno.EINVAL
    if first < 0 or first + count > size_sectors:
        return -errno.EIO
    return 0
