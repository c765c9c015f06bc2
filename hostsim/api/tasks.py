"""Tasks, events and messages: XAPI's asynchronous calls and its notification streams.

- task: "Async.<Class>.<method>" runs the method in a thread and answers a task reference at
  once; the task's status, result (an XML-RPC <value>) or error_info follow (`_async`).
- event: `event.from(classes, token, timeout)` blocks until an object of those classes changes
  after `token` (the Store's generations, see hostsim/store.py), `event.inject`.
- message: XAPI's message collection (created, destroyed, fetched with `get_since`).
"""

import logging
import threading
import time

from hostsim import errors as E
from hostsim.api.core import DEAD_SESSION
from hostsim.api.marshal import as_int, wire
from hostsim.errors import XapiError
from hostsim.store import EVENT_CLASSES, LOWER, NULL_REF, xapi_time

log = logging.getLogger("hostsim.api")


class TaskMethods:
    """task.*, event.*, message.* and the Async.* machinery (a mixin of hostsim.api.Xapi)."""

    # -- tasks ---------------------------------------------------------------------------------

    def new_task(self, label):
        return self.store.add(
            "task",
            {
                "name_label": label,
                "name_description": "",
                "status": "pending",
                "progress": 0.0,
                "result": "",
                "error_info": [],
                "created": xapi_time(),
                "finished": xapi_time(0),
                "resident_on": self.host_ref or NULL_REF,
                "other_config": {},
                "allowed_operations": ["cancel"],
                "current_operations": {},
                "type": "<none/>",
                "subtask_of": NULL_REF,
                "subtasks": [],
            },
        )

    def _async(self, session, name, fn, args):
        task = self.new_task("Async." + name)

        def run():
            self._local.session = session.ref
            try:
                value = fn(*args)
                result = "" if value is None else "<value>%s</value>" % wire(value)
                self.store.update(
                    "task",
                    task,
                    status="success",
                    progress=1.0,
                    result=result,
                    finished=xapi_time(),
                )
            except XapiError as e:
                self.store.update(
                    "task",
                    task,
                    status="failure",
                    progress=1.0,
                    error_info=e.description,
                    finished=xapi_time(),
                )
            except Exception as e:  # an internal error still completes the task
                log.exception("task %s failed", name)
                self.store.update(
                    "task",
                    task,
                    status="failure",
                    progress=1.0,
                    error_info=[E.INTERNAL_ERROR, repr(e)],
                    finished=xapi_time(),
                )

        threading.Thread(target=run, name="task " + name, daemon=True).start()
        return task

    def task__cancel(self, task):
        rec = self.store.get("task", task)
        if rec["status"] == "pending":
            self.store.update("task", task, status="cancelling")
        return ""

    def task__destroy(self, task):
        self.store.delete("task", task)
        return ""

    # -- events --------------------------------------------------------------------------------

    def event__from(self, classes, token, timeout):
        """XAPI's event.from: block until an object of `classes` changes after `token`, or timeout."""
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            raise XapiError(E.FIELD_TYPE_ERROR, "timeout") from None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise XapiError(E.FIELD_TYPE_ERROR, "classes")
        since = _parse_token(token)
        wanted = set()
        for c in classes:
            if c == "*":
                wanted.update(EVENT_CLASSES)
                continue
            name = LOWER.get(c.split("/", 1)[0].lower())
            if name is None or name not in EVENT_CLASSES:
                # XAPI ignores unknown classes silently (table_matches); keep that behaviour.
                continue
            wanted.add(name)
        session_ref = self._current_session_ref
        deadline = time.monotonic() + max(timeout, 0.0)
        st = self.store
        with st.lock:
            while True:
                if (
                    session_ref is not None
                    and not self.sessions.get(session_ref, DEAD_SESSION).valid
                ):
                    raise XapiError(E.SESSION_INVALID, session_ref)
                events, last = st.events_since(wanted, since)
                remaining = deadline - time.monotonic()
                if events or remaining <= 0:
                    break
                st.wait(min(remaining, 1.0))
        counts = st.valid_ref_counts()
        out = []
        for gen, cls, op, ref, snapshot in events:
            ev = {
                "id": str(gen),
                "timestamp": "%.6f" % time.time(),
                "class": cls.lower(),
                "operation": op,
                "ref": ref,
            }
            if snapshot is not None:
                ev["snapshot"] = snapshot
            out.append(ev)
        return {"events": out, "valid_ref_counts": counts, "token": _format_token(last)}

    def event__inject(self, cls, ref):
        name = LOWER.get(cls.lower())
        if name is None:
            raise XapiError(E.HANDLE_INVALID, cls, ref)
        self.store.mutate(name, ref, lambda f: None)
        with self.store.lock:
            row = self.store.rows[name][ref]
            row.modified = self.store._bump()
            self.store.changed.notify_all()
            return _format_token(self.store.generation - 1)

    # -- messages (large collection, fetched on demand by clients) -------------------------------

    def message__create(self, name, priority, cls, obj_uuid, body):
        return self.store.add(
            "message",
            {
                "name": name,
                "priority": as_int(priority, "priority"),
                "cls": cls,
                "obj_uuid": obj_uuid,
                "timestamp": xapi_time(),
                "body": body,
            },
        )

    def message__destroy(self, ref):
        self.store.delete("message", ref)
        return ""

    def message__get_since(self, since):
        since = str(since)
        return {
            r: m for r, m in self.store.all_records("message").items() if m["timestamp"] > since
        }


def _parse_token(token):
    if token in ("", None):
        return 0
    try:
        first = str(token).split(",")[0]
        return int(first)
    except ValueError:
        raise XapiError(E.EVENT_FROM_TOKEN_PARSE_FAILURE, token) from None


def _format_token(generation):
    # XAPI: "%020Ld,%020Ld" (database generation, message generation).
    return "%020d,%020d" % (generation, 0)
