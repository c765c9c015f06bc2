"""Event-driven XenAPI client (the XenApi event design of Xen Orchestra's XO Lite rework).

- `XapiClient.connect()` logs in to the pool master (follows HOST_IS_SLAVE), `call()` re-logs in once on
  SESSION_INVALID.
- `async with client.subscribe("vm") as vms:` gives the class's records (kept current) and
  `vms.on("add"|"mod"|"del", callback)`. Nothing is loaded before somebody subscribes.
- ONE background watcher calls `event.from` with exactly the classes that have subscribers now. When
  the set changes, the call in flight is abandoned (its result ignored) and a new one starts from the
  same token with the new set; a class without subscribers is dropped from the next call; with no
  subscriber left the watcher stops. Re-reading from an older token is safe because XAPI events carry
  object state, and events are applied idempotently: an add/mod equal to the record held fires nothing,
  a del of an unknown ref fires nothing, so each change fires its callback once.
- Task completion and object changes are awaited through these events (`wait_task`, `wait_for`), never
  polled. Messages (a large collection) are fetched on demand with `get_messages`.
"""

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import urllib.parse

from orchestrator.xapi.transport import Transport, XapiConnectionError, XapiError

log = logging.getLogger("orchestrator.xapi")

OPS = ("add", "mod", "del")
MAX_REDIRECTS = 3


def parse_task_result(text):
    """XAPI's task.result: '<value>OpaqueRef:...</value>' (or empty)."""
    text = text or ""
    if text.startswith("<value>") and text.endswith("</value>"):
        return text[len("<value>") : -len("</value>")]
    if text in ("<value/>", "<value></value>"):
        return ""
    return text


class Collection:
    """The records of one class, shared by all its subscribers."""

    def __init__(self, cls):
        self.cls = cls
        self.records = {}
        self.listeners = {op: [] for op in OPS}
        self.subscribers = 0
        self.loaded = asyncio.Event()

    def get(self, ref):
        return self.records.get(ref)

    def by_uuid(self, uuid):
        for ref, rec in self.records.items():
            if rec.get("uuid") == uuid:
                return ref, rec
        return None

    def apply(self, op, ref, snapshot):
        """Apply one event; returns (op to fire or None, record passed to the listeners)."""
        if op == "del":
            old = self.records.pop(ref, None)
            return ("del", old) if old is not None else (None, None)
        if snapshot is None:
            return None, None
        old = self.records.get(ref)
        if old is None:
            self.records[ref] = snapshot
            return "add", snapshot
        if old == snapshot:
            return None, None
        self.records[ref] = snapshot
        return "mod", snapshot

    def fire(self, op, ref, record):
        for cb in list(self.listeners[op]):
            try:
                out = cb(ref, record)
                if inspect.isawaitable(out):
                    asyncio.ensure_future(out)
            except Exception:
                log.exception("%s.%s listener failed", self.cls, op)


class Subscription:
    """One subscriber's handle on a class: records plus listeners it registered (removed on exit)."""

    def __init__(self, client, cls):
        self.client = client
        self.cls = cls
        self.collection = None
        self._mine = []

    @property
    def records(self):
        return self.collection.records

    def get(self, ref):
        return self.collection.get(ref)

    def by_uuid(self, uuid):
        return self.collection.by_uuid(uuid)

    def on(self, op, callback):
        if op not in OPS:
            raise ValueError("event %r is not one of %s" % (op, OPS))
        self.collection.listeners[op].append(callback)
        self._mine.append((op, callback))
        return callback

    def off(self, op, callback):
        with contextlib.suppress(ValueError):
            self.collection.listeners[op].remove(callback)
        with contextlib.suppress(ValueError):
            self._mine.remove((op, callback))

    async def __aenter__(self):
        self.collection = await self.client._subscribe(self.cls)
        return self

    async def __aexit__(self, *exc):
        for op, cb in self._mine:
            with contextlib.suppress(ValueError):
                self.collection.listeners[op].remove(cb)
        self._mine.clear()
        self.client._unsubscribe(self.cls)


class XapiClient:
    def __init__(
        self,
        url,
        user,
        password,
        *,
        verify=True,
        cafile=None,
        fingerprint=None,
        event_timeout=30.0,
        originator="xcp-fastpath",
        retry_delay=1.0,
    ):
        self.url = url
        self.user = user
        self.password = password
        self.verify = verify
        self.cafile = cafile
        self.fingerprint = fingerprint
        self.event_timeout = float(event_timeout)
        self.originator = originator
        self.retry_delay = retry_delay
        self.transport = self._transport(url)
        self.session = None
        self.logins = 0
        self.collections = {}
        self.event_calls = []  # class lists of every event.from call the watcher made (for tests/metrics)
        self._token = None
        self._watcher = None
        self._classes_changed = asyncio.Event()
        self._login_lock = asyncio.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="xapi-call"
        )
        self._event_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="xapi-event"
        )
        self._closed = False

    def _transport(self, url):
        return Transport(
            url,
            verify=self.verify,
            cafile=self.cafile,
            fingerprint=self.fingerprint,
            timeout=self.event_timeout + 60.0,
        )

    # -- session -------------------------------------------------------------------------------

    async def _run(self, pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def connect(self):
        """Log in to the pool master, following HOST_IS_SLAVE redirects."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                self.session = await self._run(
                    self._pool,
                    self.transport.call,
                    "session.login_with_password",
                    self.user,
                    self.password,
                    "2.21",
                    self.originator,
                )
                self.logins += 1
                return self.session
            except XapiError as e:
                if e.code != "HOST_IS_SLAVE" or not e.params:
                    raise
                self.url = _redirect(self.url, e.params[0])
                log.info("pool master is %s: reconnecting", self.url)
                self.transport = self._transport(self.url)
        raise XapiError(["HOST_IS_SLAVE", "too many redirects"])

    async def _relogin(self, failed_session):
        async with self._login_lock:
            if self.session != failed_session:
                return  # somebody else re-logged in already
            await self.connect()

    async def call(self, method, *args):
        """Call a XAPI method with the session; re-login once on SESSION_INVALID."""
        for attempt in (1, 2):
            session = self.session
            if session is None:
                await self.connect()
                session = self.session
            try:
                return await self._run(self._pool, self.transport.call, method, session, *args)
            except XapiError as e:
                if e.code != "SESSION_INVALID" or attempt == 2:
                    raise
                await self._relogin(session)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self):
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self._run(self._pool, self.transport.call, "session.logout", self.session)
            self.session = None
        self._pool.shutdown(wait=False)
        self._event_pool.shutdown(wait=False)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, cls):
        """`async with client.subscribe("vm") as vms`: records + add/mod/del listeners of a class."""
        return Subscription(self, cls.lower())

    @property
    def watched(self):
        return sorted(self.collections)

    async def _subscribe(self, cls):
        coll = self.collections.get(cls)
        if coll is None:
            coll = Collection(cls)
            self.collections[cls] = coll
            coll.subscribers += 1
            try:
                await self._load(coll)
            except BaseException:
                coll.subscribers -= 1
                if coll.subscribers == 0:
                    self.collections.pop(cls, None)
                raise
            self._classes_changed.set()
            self._ensure_watcher()
        else:
            coll.subscribers += 1
            await coll.loaded.wait()
        return coll

    def _unsubscribe(self, cls):
        coll = self.collections.get(cls)
        if coll is None:
            return
        coll.subscribers -= 1
        if coll.subscribers <= 0:
            del self.collections[cls]
            # Dropped from the next event.from call (the call in flight just returns its events).

    async def _load(self, coll):
        """Fill a collection: event.from([cls], "", 0) returns every object as an add and a token."""
        result = await self._event_from([coll.cls], "", 0.0)
        for ev in result["events"]:
            if ev.get("operation") != "del" and "snapshot" in ev:
                coll.records[ev["ref"]] = ev["snapshot"]
        # The watcher must restart from no later than this load (tokens compare as strings: XAPI
        # zero-pads them for that), or changes between the load and its token would be missed.
        self._token = _min_token(self._token, result["token"])
        coll.loaded.set()

    async def _event_from(self, classes, token, timeout):
        self.event_calls.append(list(classes))
        for attempt in (1, 2):
            session = self.session
            try:
                return await self._run(
                    self._event_pool,
                    self.transport.call,
                    "event.from",
                    session,
                    list(classes),
                    token,
                    timeout,
                )
            except XapiError as e:
                if e.code != "SESSION_INVALID" or attempt == 2:
                    raise
                await self._relogin(session)
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_watcher(self):
        if self._closed:
            return
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _reload_all(self):
        self._token = None
        for coll in list(self.collections.values()):
            result = await self._event_from([coll.cls], "", 0.0)
            self._token = _min_token(self._token, result["token"])
            seen = set()
            for ev in result["events"]:
                if ev.get("operation") == "del":
                    continue
                seen.add(ev["ref"])
                op, rec = coll.apply("mod", ev["ref"], ev.get("snapshot"))
                if op:
                    coll.fire(op, ev["ref"], rec)
            for ref in [r for r in coll.records if r not in seen]:
                op, rec = coll.apply("del", ref, None)
                if op:
                    coll.fire(op, ref, rec)

    async def _watch(self):
        while self.collections and not self._closed:
            classes = sorted(self.collections)
            self._classes_changed.clear()
            self.event_calls.append(list(classes))
            session = self.session
            fut = asyncio.get_running_loop().run_in_executor(
                self._event_pool,
                self.transport.call,
                "event.from",
                session,
                classes,
                self._token,
                self.event_timeout,
            )
            changed = asyncio.ensure_future(self._classes_changed.wait())
            try:
                done, _ = await asyncio.wait({fut, changed}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                changed.cancel()
                fut.add_done_callback(_swallow)
                raise
            if self._classes_changed.is_set() or fut not in done:
                # Subscriptions changed: abandon this call and start over from the same token.
                changed.cancel()
                fut.add_done_callback(_swallow)
                continue
            changed.cancel()
            try:
                result = fut.result()
            except XapiError as e:
                if e.code == "SESSION_INVALID":
                    try:
                        await self._relogin(session)
                    except (XapiError, XapiConnectionError) as e2:
                        log.warning("re-login failed: %s", e2)
                        await asyncio.sleep(self.retry_delay)
                    continue
                if e.code in ("EVENTS_LOST", "EVENT_FROM_TOKEN_PARSE_FAILURE"):
                    await self._reload_all()
                    continue
                log.warning("event.from failed: %s", e)
                await asyncio.sleep(self.retry_delay)
                continue
            except XapiConnectionError as e:
                log.warning("event.from: %s", e)
                await asyncio.sleep(self.retry_delay)
                continue
            self._dispatch(result)

    def _dispatch(self, result):
        for ev in result.get("events", []):
            coll = self.collections.get(ev.get("class"))
            if coll is None:
                continue  # a class nobody watches any more
            op, rec = coll.apply(ev.get("operation"), ev.get("ref"), ev.get("snapshot"))
            if op:
                coll.fire(op, ev["ref"], rec)
        self._token = result.get("token", self._token)

    # -- waiting through events ----------------------------------------------------------------

    async def wait_for(self, cls, ref, predicate, timeout=None):
        """Wait until predicate(record) holds for object ref (or it is deleted: returns None)."""
        loop = asyncio.get_running_loop()
        async with self.subscribe(cls) as sub:
            fut = loop.create_future()

            def check(r, rec):
                if r == ref and not fut.done() and predicate(rec):
                    fut.set_result(rec)

            def gone(r, rec):
                if r == ref and not fut.done():
                    fut.set_result(None)

            sub.on("add", check)
            sub.on("mod", check)
            sub.on("del", gone)
            rec = sub.get(ref)
            if rec is not None and predicate(rec):
                return rec
            if rec is None:
                # Not in the collection: check it exists at all (raises HANDLE_INVALID otherwise).
                rec = await self.call("%s.get_record" % cls, ref)
                if predicate(rec):
                    return rec
            return await asyncio.wait_for(fut, timeout)

    async def wait_task(self, task, timeout=None, destroy=True):
        """Wait for a task to leave 'pending' (through task events); its result or XapiError."""
        rec = await self.wait_for(
            "task", task, lambda r: r.get("status") not in ("pending", "cancelling"), timeout
        )
        if rec is None:
            raise XapiError(["HANDLE_INVALID", "task", task])
        try:
            if rec["status"] == "success":
                return parse_task_result(rec.get("result"))
            if rec["status"] == "cancelled":
                raise XapiError(rec.get("error_info") or ["TASK_CANCELLED", task])
            raise XapiError(rec.get("error_info") or ["INTERNAL_ERROR", "task %s failed" % task])
        finally:
            if destroy:
                with contextlib.suppress(XapiError, XapiConnectionError):
                    await self.call("task.destroy", task)

    async def call_async(self, method, *args, timeout=None):
        """Run Async.<method> and await its task through events."""
        task = await self.call("Async." + method, *args)
        return await self.wait_task(task, timeout=timeout)

    # -- large collections on demand -----------------------------------------------------------

    async def get_messages(self, since=None):
        """Messages (alarms), fetched when asked: all of them, or those after a XAPI datetime."""
        if since is None:
            return await self.call("message.get_all_records")
        return await self.call("message.get_since", since)


def _redirect(url, master):
    """The master's URL: same scheme and path, the address HOST_IS_SLAVE named (host or host:port)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, master, parts.path or "/", "", ""))


def _min_token(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _swallow(fut):
    if not fut.cancelled():
        fut.exception()
