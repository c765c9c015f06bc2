"""hostsim: a simulated XCP-ng pool (one host, or several: `Pool(root, hosts=N)`) for tests,
demos and benchmarks.

    store.py     in-memory object database with XAPI's event generations (event.from semantics)
    api/         XAPI methods, one module per class family: core (dispatch, sessions, generic
                 getters/setters), vm, vbd, storage (SR, VDI, CBT), hosts, tasks (+ event.from)
    server.py    XML-RPC over HTTP(S) (the XenAPI SDK works unmodified) + routes for the data paths
    sm.py        file SR with SM's VHD (or QCOW2) semantics: snapshot/clone, CBT logs, GC (coalesce, leaf-coalesce)
    vhdfile.py   in-place VHD writes, hidden flag, relink (on agent.vhd.format's structures)
    qcow2file.py QCOW2 VDIs as XCP-ng 8.3's SM keeps them (<uuid>.qcow2, backing chains, SM's hidden
                 extension); writes/reads through qemu-nbd, coalesce/relink with qemu-img
    datapath.py  /export_raw_vdi and /import_raw_vdi done the XAPI way
    xapiexport/  export_raw_vdi?format=vhd as processes (tapdisk with O_DIRECT behind blktap's
                 ring limits, vhd-tool, the TLS hop): the default "processes" export model
    xapinbd.py   an NBD endpoint behaving like xapi-nbd
    plugins.py   host.call_plugin running plugin files with a XenAPIPlugin shim (plugin_shim/)
    guest.py     guest activity (text, binary, random, zeros, copies between VMs)
    host.py      Pool: pool + hosts + SRs (each host's local one, a shared one) + PBD records,
                 GC -> database glue, serving
    agents.py    the fastpath agent and its plugin on each host (own ports, SR roots, config)
    demopool.py  the VMs `serve` builds: a template, fast clones, spread over hosts and SRs
    cli.py       `hostsim serve|write|gc|info|stop` (`serve --hosts N --no-agent-on I`)

Quick use in tests: `Pool(tmp_path).start()` returns the XAPI URL (user root, password hostsim);
see tests/fixtures/hostsim.py.
"""
