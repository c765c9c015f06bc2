"""The event-driven XenAPI client (orchestrator.xapi) against hostsim.

hostsim records every XML-RPC call it receives (api.record_calls), so these tests count the event.from
calls and the class lists they carried on the server side, not only what the client believes it sent.
"""

import asyncio
import time

import pytest

from hostsim.api import Xapi
from hostsim.certs import fingerprint
from hostsim.host import Pool
from hostsim.server import XapiHTTPServer
from orchestrator.xapi import XapiClient, XapiError, XapiTlsError

MiB = 1 << 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def until(predicate, timeout=30.0, what="condition"):
    """Bounded wait for a condition driven by another thread/task (never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        await asyncio.sleep(0.01)


def server_event_calls(pool):
    return [
        params[0]
        for method, params in list(pool.api.calls)
        if method in ("event.from", "event_from")
    ]


def client_for(pool, **kw):
    kw.setdefault("event_timeout", 10.0)
    return XapiClient(pool.server.url, "root", "hostsim", **kw)


def test_only_subscribed_classes_are_watched(hostsim_pool):
    pool = hostsim_pool
    pool.api.record_calls = True
    vm = pool.create_vm("alpha", [4 * MiB])

    async def main():
        async with client_for(pool) as client:
            # Nothing is loaded before somebody asks.
            assert server_event_calls(pool) == []
            assert not [m for m, _ in pool.api.calls if m.endswith("get_all_records")]

            async with client.subscribe("vm") as vms:
                assert list(vms.records) == [vm]
                await until(lambda: len(server_event_calls(pool)) >= 2, what="first watcher call")
                assert all(c == ["vm"] for c in server_event_calls(pool))

                async with client.subscribe("vdi") as vdis:
                    assert len(vdis.records) == 1
                    mark = len(server_event_calls(pool))
                    await until(
                        lambda: ["vdi", "vm"] in server_event_calls(pool)[mark:], what="vdi+vm call"
                    )
                    assert all(set(c) <= {"vm", "vdi"} for c in server_event_calls(pool))
                    # Let the server see every call the watcher issued, then drop "vm".
                    await until(
                        lambda: len(server_event_calls(pool)) == len(client.event_calls),
                        what="calls in sync",
                    )
                mark = len(server_event_calls(pool))
                # "vdi" has no subscriber left: a vdi change ends the call in flight, and every call
                # issued from now on carries "vm" only.
                pool.api.store.update("VDI", pool.vm_vdis(vm)[0], name_label="poke")
                await until(
                    lambda: len(server_event_calls(pool)) > mark, what="call after vdi unsubscribe"
                )
                await until(
                    lambda: len(server_event_calls(pool)) == len(client.event_calls),
                    what="calls in sync",
                )
                later = len(server_event_calls(pool))
                pool.api.store.update("VM", vm, name_label="poke")
                await until(
                    lambda: len(server_event_calls(pool)) > later, what="call after vm change"
                )
                assert all(c == ["vm"] for c in server_event_calls(pool)[mark:])
            # Nobody left: the watcher stops once its call returns.
            pool.api.store.update("VM", vm, name_label="poke again")
            await until(
                lambda: client._watcher is None or client._watcher.done(), what="watcher stop"
            )
            assert client.watched == []

    run(main())


def test_add_mod_del_callbacks_fire_once_each(hostsim_pool):
    pool = hostsim_pool
    seen = {"add": [], "mod": [], "del": []}

    async def main():
        async with client_for(pool) as client:
            async with client.subscribe("vm") as vms:
                for op in seen:
                    vms.on(
                        op,
                        lambda ref, rec, op=op: seen[op].append((ref, rec and rec["name_label"])),
                    )
                vm = pool.create_vm("alpha", [])
                await until(lambda: seen["add"], what="add")
                pool.api.store.update("VM", vm, name_label="beta")
                await until(lambda: seen["mod"], what="mod")
                # Subscribing another class restarts event.from from the same token: the VM events are
                # replayed by the server and must not fire again.
                async with client.subscribe("sr"):
                    pool.api.store.update("SR", pool.sr_ref, name_label="poke")
                    await until(
                        lambda: client.collections["sr"].get(pool.sr_ref)["name_label"] == "poke"
                    )
                pool.api.store.delete("VM", vm)
                await until(lambda: seen["del"], what="del")
                assert vm not in vms.records
                # One more round trip so any duplicate would have arrived.
                pool.api.store.update("SR", pool.sr_ref, name_label="poke2")
                other = pool.create_vm("gamma", [])
                await until(lambda: other in vms.records)
        return vm

    vm = run(main())
    assert seen["add"][0] == (vm, "alpha")
    assert seen["mod"] == [(vm, "beta")]
    assert seen["del"] == [(vm, "beta")]
    assert [r for r, _ in seen["add"]].count(vm) == 1


def test_unsubscribe_stops_callbacks(hostsim_pool):
    pool = hostsim_pool
    vm = pool.create_vm("alpha", [])
    first, second = [], []

    async def main():
        async with client_for(pool) as client:
            async with client.subscribe("vm") as b:
                b.on("mod", lambda ref, rec: second.append(rec["name_label"]))
                async with client.subscribe("vm") as a:
                    a.on("mod", lambda ref, rec: first.append(rec["name_label"]))
                    pool.api.store.update("VM", vm, name_label="one")
                    await until(lambda: first == ["one"] and second == ["one"])
                pool.api.store.update("VM", vm, name_label="two")
                await until(lambda: second == ["one", "two"])
                assert first == ["one"]

    run(main())


def test_session_loss_recovers(hostsim_pool):
    pool = hostsim_pool
    vm = pool.create_vm("alpha", [])
    names = []

    async def main():
        async with client_for(pool) as client:
            async with client.subscribe("vm") as vms:
                vms.on("mod", lambda ref, rec: names.append(rec["name_label"]))
                await until(lambda: len(client.event_calls) >= 2)
                pool.api.invalidate_all_sessions()  # what a XAPI restart does to its clients
                pool.api.store.update("VM", vm, name_label="after")
                await until(lambda: names == ["after"], what="event after session loss")
                assert client.logins >= 2
                # Plain calls recover too.
                pool.api.invalidate_all_sessions()
                assert await client.call("VM.get_name_label", vm) == "after"

    run(main())


def test_tasks_are_awaited_through_events(hostsim_pool):
    pool = hostsim_pool
    pool.api.record_calls = True
    vm = pool.create_vm("alpha", [4 * MiB])

    async def main():
        async with client_for(pool) as client:
            snap = await client.call_async("VM.snapshot", vm, "backup")
            assert await client.call("VM.get_is_a_snapshot", snap) is True
            with pytest.raises(XapiError) as err:
                await client.call_async("VM.destroy", "OpaqueRef:gone")
            assert err.value.details == ["HANDLE_INVALID", "VM", "OpaqueRef:gone"]
            # Waited on through event.from on "task", never by polling task.get_status.
            assert not [m for m, _ in pool.api.calls if m.startswith("task.get_")]
            assert all(c == ["task"] for c in server_event_calls(pool))
            # wait_for: a VM change awaited through events
            waiter = asyncio.ensure_future(
                client.wait_for("vm", vm, lambda r: r["power_state"] == "Running")
            )
            await until(lambda: "vm" in client.collections)
            await client.call("VM.start", vm, False, False)
            rec = await asyncio.wait_for(waiter, 30)
            assert rec["power_state"] == "Running"

    run(main())


def test_messages_are_fetched_on_demand(hostsim_pool):
    pool = hostsim_pool
    pool.api.record_calls = True

    async def main():
        async with client_for(pool) as client:
            await client.call("message.create", "ALARM", "3", "VM", "x", "disk full")
            msgs = await client.get_messages()
            assert [m["name"] for m in msgs.values()] == ["ALARM"]
            assert server_event_calls(pool) == []

    run(main())


def test_host_is_slave_redirects_to_the_master(hostsim_pool):
    pool = hostsim_pool
    slave = Xapi()
    slave.master_address = "127.0.0.1:%d" % pool.server.server_address[1]
    server = XapiHTTPServer(("127.0.0.1", 0), slave).start()

    async def main():
        client = XapiClient(server.url, "root", "hostsim")
        try:
            await client.connect()
            assert client.url.rstrip("/") == pool.server.url.rstrip("/")
            assert (await client.call("pool.get_all")) == [pool.pool_ref]
        finally:
            await client.close()

    try:
        run(main())
    finally:
        server.stop()


def test_tls_with_certificate_pinning(tmp_path):
    pool = Pool(tmp_path / "tlspool")
    url = pool.start(tls=True)
    assert url.startswith("https://")

    async def login(**kw):
        client = XapiClient(url, "root", "hostsim", **kw)
        try:
            await client.connect()
            return await client.call("pool.get_all")
        finally:
            await client.close()

    try:
        assert run(login(fingerprint=fingerprint(pool.cert_pem))) == [pool.pool_ref]
        assert run(login(cafile=pool.cert_path)) == [pool.pool_ref]
        with pytest.raises(XapiTlsError):
            run(login(fingerprint="00" * 32))
        with pytest.raises(OSError):  # unknown CA, no pin: refused
            run(login())
    finally:
        pool.stop()


def test_a_bad_token_reloads_the_collections(hostsim_pool):
    pool = hostsim_pool
    a = pool.create_vm("a", [])
    b = pool.create_vm("b", [])
    seen = []

    async def main():
        async with client_for(pool) as client:
            async with client.subscribe("vm") as vms:
                vms.on("del", lambda ref, rec: seen.append(("del", ref)))
                vms.on("mod", lambda ref, rec: seen.append(("mod", rec["name_label"])))
                await until(lambda: len(client.event_calls) >= 2)
                pool.api.store.delete("VM", b)
                client._token = (
                    "not-a-token"  # the server will answer EVENT_FROM_TOKEN_PARSE_FAILURE
                )
                pool.api.store.update("VM", a, name_label="a2")
                await until(lambda: ("del", b) in seen and ("mod", "a2") in seen, what="reload")
                assert set(vms.records) == {a}

    run(main())


def test_watcher_survives_a_xapi_outage(hostsim_pool):
    pool = hostsim_pool
    vm = pool.create_vm("alpha", [])
    names = []
    port = pool.server.server_address[1]

    async def main():
        async with client_for(pool, retry_delay=0.05) as client:
            async with client.subscribe("vm") as vms:
                vms.on("mod", lambda ref, rec: names.append(rec["name_label"]))
                await until(lambda: len(client.event_calls) >= 2)
                pool.server.stop()  # refuses new connections and cuts the open ones
                failed_before = len(client.event_calls)
                await until(lambda: len(client.event_calls) >= failed_before + 2, what="retries")
                pool.api.store.update("VM", vm, name_label="during outage")
                restarted = XapiHTTPServer(("127.0.0.1", port), pool.api).start()
                try:
                    await until(lambda: names == ["during outage"], what="event after the outage")
                finally:
                    restarted.stop()
                pool.server = XapiHTTPServer(
                    ("127.0.0.1", 0), pool.api
                ).start()  # for the fixture's stop()

    run(main())
