"""hostsim's model of XAPI's export_raw_vdi?format=vhd, in the processes a real host runs.

    client --TLS--> [stunnel hop] <--socket-- vhd-tool <--blktap ring-- tapdisk <--O_DIRECT-- VHD chain
                    (relay in the        (process)        (socket +      (process)
                     XAPI process)                         shared pages)

    pipeline.py  the xapi side: headers already sent, start tapdisk (attach), run vhd-tool with the
                 client's socket (or the TLS relay) as destination, read its progress, reap both
    tapdisk.py   opens the chain, serves sector reads on the ring, O_DIRECT, 32 concurrent readers
    vhdtool.py   blocks from the VHD metadata, reads them through the ring, writes the VHD stream
    blkif.py     blktap's limits (11 pages per request, 32 requests) and the ring's wire codec
    layout.py    the stream layout shared with the "inline" model, and the block selection
    procutil.py  die-with-parent, whole writes, notes on stderr

Every modelled fact names its source (repository and path) in the module that models it; the
summary, what is left out and measurements are in docs/benchmarks.md, "hostsim's model of XAPI's
export". Selected per pool with hostsim.datapath.set_export_model(pool, "processes" | "inline").
"""
