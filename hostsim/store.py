"""The in-memory object database of hostsim, with XAPI's event generations.

Every add/mod/del bumps one global generation counter; each live object remembers the generation at
which it was created and last modified, each deleted one (a tombstone) the generation of its deletion.
`event.from` (see `events_since`) turns "everything that changed after generation N in these classes"
into add/mod/del events, exactly like XAPI's Xapi_event.From over its database: an event is the
object's current state, never a queued history, so re-reading from an old token is always safe.
"""

import copy
import threading
import time
import uuid as uuidlib

from hostsim.errors import HANDLE_INVALID, UUID_INVALID, XapiError

NULL_REF = "OpaqueRef:NULL"

# The classes hostsim knows, with XAPI's spelling (API name) -> defaults of their fields.
CLASSES = ("pool", "host", "SR", "PBD", "VDI", "VBD", "VM", "task", "message", "session")
CLASSES += ("network", "VIF")
LOWER = {c.lower(): c for c in CLASSES}

# Classes whose changes are visible through event.from (XAPI: gen_events objects).
EVENT_CLASSES = ("pool", "host", "SR", "PBD", "VDI", "VBD", "VM", "task", "message")
EVENT_CLASSES += ("network", "VIF")


def new_ref():
    return "OpaqueRef:" + str(uuidlib.uuid4())


def new_uuid():
    return str(uuidlib.uuid4())


def xapi_time(t=None):
    """XAPI's DateTime text: 20240101T12:00:00Z."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


class Row:
    __slots__ = ("cls", "ref", "fields", "created", "modified")

    def __init__(self, cls, ref, fields, generation):
        self.cls = cls
        self.ref = ref
        self.fields = fields
        self.created = generation
        self.modified = generation


class Store:
    """Objects of every class, keyed by reference, plus the generation bookkeeping of event.from."""

    def __init__(self):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.generation = 0
        self.rows = {cls: {} for cls in CLASSES}
        self.by_uuid = {cls: {} for cls in CLASSES}
        # (generation deleted, generation created, class, ref)
        self.tombstones = []
        self.closed = False

    # -- lookups -------------------------------------------------------------------------------

    def cls_of(self, ref):
        with self.lock:
            for cls, rows in self.rows.items():
                if ref in rows:
                    return cls
        return None

    def exists(self, cls, ref):
        with self.lock:
            return ref in self.rows[cls]

    def get(self, cls, ref):
        """A deep copy of the record; HANDLE_INVALID if there is no such object."""
        with self.lock:
            row = self.rows[cls].get(ref)
            if row is None:
                raise XapiError(HANDLE_INVALID, cls, ref)
            return copy.deepcopy(row.fields)

    def field(self, cls, ref, name):
        with self.lock:
            row = self.rows[cls].get(ref)
            if row is None:
                raise XapiError(HANDLE_INVALID, cls, ref)
            return copy.deepcopy(row.fields[name])

    def all_refs(self, cls):
        with self.lock:
            return list(self.rows[cls])

    def all_records(self, cls):
        with self.lock:
            return {ref: copy.deepcopy(row.fields) for ref, row in self.rows[cls].items()}

    def by_uuid_ref(self, cls, uuid):
        with self.lock:
            ref = self.by_uuid[cls].get(uuid)
            if ref is None:
                raise XapiError(UUID_INVALID, cls, uuid)
            return ref

    def where(self, cls, **match):
        with self.lock:
            return [
                ref
                for ref, row in self.rows[cls].items()
                if all(row.fields.get(k) == v for k, v in match.items())
            ]

    # -- changes -------------------------------------------------------------------------------

    def _bump(self):
        self.generation += 1
        return self.generation

    def add(self, cls, fields, ref=None):
        with self.lock:
            ref = ref or new_ref()
            fields = copy.deepcopy(fields)
            fields.setdefault("uuid", new_uuid())
            row = Row(cls, ref, fields, self._bump())
            self.rows[cls][ref] = row
            self.by_uuid[cls][fields["uuid"]] = ref
            self.changed.notify_all()
            return ref

    def update(self, cls, ref, **changes):
        """Set fields; one mod event (one generation) whatever the number of fields."""
        with self.lock:
            row = self.rows[cls].get(ref)
            if row is None:
                raise XapiError(HANDLE_INVALID, cls, ref)
            real = {k: v for k, v in changes.items() if row.fields.get(k) != v}
            if not real:
                return
            row.fields.update(copy.deepcopy(real))
            row.modified = self._bump()
            self.changed.notify_all()

    def mutate(self, cls, ref, fn):
        """Apply fn(fields) in place under the lock, as one modification."""
        with self.lock:
            row = self.rows[cls].get(ref)
            if row is None:
                raise XapiError(HANDLE_INVALID, cls, ref)
            before = copy.deepcopy(row.fields)
            fn(row.fields)
            if row.fields != before:
                row.modified = self._bump()
                self.changed.notify_all()

    def list_add(self, cls, ref, name, value):
        def fn(f):
            if value not in f[name]:
                f[name].append(value)

        self.mutate(cls, ref, fn)

    def list_remove(self, cls, ref, name, value):
        def fn(f):
            if value in f[name]:
                f[name].remove(value)

        if self.exists(cls, ref):
            self.mutate(cls, ref, fn)

    def delete(self, cls, ref):
        with self.lock:
            row = self.rows[cls].pop(ref, None)
            if row is None:
                raise XapiError(HANDLE_INVALID, cls, ref)
            self.by_uuid[cls].pop(row.fields.get("uuid"), None)
            self.tombstones.append((self._bump(), row.created, cls, ref))
            self.changed.notify_all()

    # -- events --------------------------------------------------------------------------------

    def events_since(self, classes, since):
        """(events, last generation) for classes (API names) after generation `since`.

        One event per object: "add" if it was created after `since`, else "mod" if modified after,
        "del" for objects deleted after `since` that existed before it (created-and-deleted objects
        are invisible, as in XAPI). Caller holds the lock.
        """
        events = []
        for gen, created, cls, ref in self.tombstones:
            if gen > since and cls in classes and created <= since:
                events.append((gen, cls, "del", ref, None))
        for cls in classes:
            for ref, row in self.rows[cls].items():
                if row.created > since:
                    events.append((row.modified, cls, "add", ref, copy.deepcopy(row.fields)))
                elif row.modified > since:
                    events.append((row.modified, cls, "mod", ref, copy.deepcopy(row.fields)))
        events.sort(key=lambda e: e[0])
        return events, self.generation

    def valid_ref_counts(self):
        with self.lock:
            return {
                cls.lower(): len(rows) for cls, rows in self.rows.items() if cls in EVENT_CLASSES
            }

    def wait(self, timeout):
        """Wait for any change (caller holds the lock)."""
        self.changed.wait(timeout)

    def wake_all(self):
        with self.lock:
            self.changed.notify_all()
