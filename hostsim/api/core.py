"""The core of the Xapi object: its state, dispatch of an XML-RPC call to the method that serves
it, sessions (login, logout, validity), and the generic per-class methods every XAPI class has
(get_all, get_all_records, get_record, get_by_uuid, get_by_name_label, get_<field>, set_<field>
for SETTABLE fields, add_to_/remove_from_<map field>).

How a call finds its code: "<Class>.<method>" is served by the Xapi object's method
`<class>__<method>` (lower-case class: `vm__clone`, `vdi__enable_cbt`), defined by the class
families' mixins (hostsim/api/vm.py, storage.py, ...); a call without such a method falls back
to the generic ones here, over the Store. "Async.<Class>.<method>" runs the same code in a task
(hostsim/api/tasks.py). hostsim's own methods ("hostsim.write", ...) live in `extensions`.
"""

import inspect
import threading

from hostsim import errors as E
from hostsim.errors import XapiError
from hostsim.store import LOWER, NULL_REF, Store, xapi_time

MAP_FIELDS = ("other_config", "sm_config", "xenstore_data", "device_config", "blocked_operations")
SETTABLE = ("name_label", "name_description", "other_config", "tags", "blocked_operations")


class Session:
    __slots__ = ("ref", "user", "valid")

    def __init__(self, ref, user):
        self.ref = ref
        self.user = user
        self.valid = True


class _Dead:
    valid = False


DEAD_SESSION = _Dead()  # stands in for a session the pool does not know (logged out, never issued)


class Core:
    """The Xapi object's state, its dispatcher and its sessions (the base of hostsim.api.Xapi)."""

    def __init__(self, store=None, user="root", password="hostsim"):
        self.store = store or Store()
        self.user = user
        self.password = password
        self.sessions = {}
        self.srs = {}  # SR uuid -> backend
        self.plugins = None  # hostsim.plugins.PluginRunner (of a host without its own)
        self.host_plugins = {}  # host ref -> that host's PluginRunner (its /etc/xapi.d/plugins)
        self.host_certificates = {}  # host ref -> that host's TLS certificate (PEM)
        self.nbd_address = None  # (host, port) of the xapi-nbd endpoint
        self.host_nbd = {}  # host ref -> (address, port) of that host's xapi-nbd (several hosts)
        self.certificate_pem = ""
        self.cert_subject = "localhost"
        self.master_address = None  # set on a "slave" to refuse logins with HOST_IS_SLAVE
        self.calls = []  # (method, params without session) for tests that count calls
        self.record_calls = False
        self.host_ref = None
        self.pool_ref = None
        self.guest_lock = threading.RLock()
        # hostsim's own methods (not XAPI's): "hostsim.write", "hostsim.gc", ...
        self.extensions = {}

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch(self, method, params):
        params = list(params)
        if self.record_calls:
            self.calls.append((method, params[1:]))
        if (
            method.startswith("session.login")
            or method == "session.slave_local_login_with_password"
        ):
            return self.session_login(method, params)
        if method == "system.listMethods":
            return []
        if method in ("event_from", "event.from"):
            method = "event.from"
        is_async = method.startswith("Async.")
        name = method[len("Async.") :] if is_async else method
        if name in self.extensions:
            fn = self.extensions[name]
            nargs = len(inspect.signature(fn).parameters)
            if len(params) != nargs + 1:
                raise XapiError(E.MESSAGE_PARAMETER_COUNT_MISMATCH, method, nargs + 1, len(params))
            session = self._session(params[0])
            if is_async:
                return self._async(session, name, fn, params[1:])
            return fn(*params[1:])
        if "." not in name:
            raise XapiError(E.MESSAGE_METHOD_UNKNOWN, method)
        cls_part, meth = name.split(".", 1)
        cls = "event" if cls_part.lower() == "event" else LOWER.get(cls_part.lower())
        if cls is None:
            raise XapiError(E.MESSAGE_METHOD_UNKNOWN, method)
        fn, nargs = self._resolve(cls, meth, method)
        if len(params) != nargs + 1:
            raise XapiError(E.MESSAGE_PARAMETER_COUNT_MISMATCH, method, nargs + 1, len(params))
        session = self._session(params[0])
        args = params[1:]
        if is_async:
            return self._async(session, name, fn, args)
        return fn(*args)

    def _resolve(self, cls, meth, method):
        special = getattr(self, "%s__%s" % (cls.lower(), meth), None)
        if special is not None:
            return special, len(inspect.signature(special).parameters)
        if cls == "event":
            raise XapiError(E.MESSAGE_METHOD_UNKNOWN, method)
        st = self.store
        if meth == "get_all":
            return (lambda: st.all_refs(cls)), 0
        if meth == "get_all_records":
            return (lambda: st.all_records(cls)), 0
        if meth == "get_record":
            return (lambda ref: st.get(cls, ref)), 1
        if meth == "get_by_uuid":
            return (lambda uuid: st.by_uuid_ref(cls, uuid)), 1
        if meth == "get_by_name_label":
            return (lambda label: st.where(cls, name_label=label)), 1
        if meth.startswith("get_"):
            field = meth[4:]
            return (lambda ref: self._get_field(cls, ref, field, method)), 1
        if meth.startswith("set_") and meth[4:] in SETTABLE:
            field = meth[4:]
            return (lambda ref, value: st.update(cls, ref, **{field: value})), 2
        if meth.startswith("add_to_") and meth[7:] in MAP_FIELDS:
            field = meth[7:]
            return (lambda ref, k, v: st.mutate(cls, ref, lambda f: f[field].__setitem__(k, v))), 3
        if meth.startswith("remove_from_") and meth[12:] in MAP_FIELDS:
            field = meth[12:]
            return (lambda ref, k: st.mutate(cls, ref, lambda f: f[field].pop(k, None))), 2
        raise XapiError(E.MESSAGE_METHOD_UNKNOWN, method)

    def _get_field(self, cls, ref, field, method):
        rec = self.store.get(cls, ref)
        if field not in rec:
            raise XapiError(E.MESSAGE_METHOD_UNKNOWN, method)
        return rec[field]

    # -- sessions ------------------------------------------------------------------------------

    def session_login(self, method, params):
        if method not in ("session.login_with_password", "session.slave_local_login_with_password"):
            raise XapiError(E.MESSAGE_METHOD_UNKNOWN, method)
        if not 2 <= len(params) <= 4:
            raise XapiError(E.MESSAGE_PARAMETER_COUNT_MISMATCH, method, 4, len(params))
        if self.master_address:
            raise XapiError(E.HOST_IS_SLAVE, self.master_address)
        user, password = params[0], params[1]
        if user != self.user or password != self.password:
            raise XapiError(E.SESSION_AUTHENTICATION_FAILED, user, "Authentication failure")
        ref = self.store.add(
            "session",
            {"this_host": self.host_ref or NULL_REF, "last_active": xapi_time(), "originator": ""},
        )
        self.sessions[ref] = Session(ref, user)
        return ref

    def _session(self, ref):
        s = self.sessions.get(ref)
        if s is None or not s.valid:
            raise XapiError(E.SESSION_INVALID, ref)
        return s

    def session__get_this_host(self, session):
        self._session(session)
        return self.host_ref or NULL_REF

    def session__get_uuid(self, session):
        return self.store.field("session", session, "uuid")

    def invalidate_session(self, ref):
        s = self.sessions.pop(ref, None)
        if s is not None:
            s.valid = False
            if self.store.exists("session", ref):
                self.store.delete("session", ref)
        self.store.wake_all()

    def invalidate_all_sessions(self):
        """What a XAPI restart does to its clients: every session becomes SESSION_INVALID."""
        for ref in list(self.sessions):
            self.invalidate_session(ref)

    # The session of the call in progress (dispatch is per thread).
    _local = threading.local()

    @property
    def _current_session_ref(self):
        return getattr(self._local, "session", None)

    def call(self, method, params):
        """dispatch() with the calling session remembered for handlers that need it."""
        self._local.session = params[0] if params and isinstance(params[0], str) else None
        try:
            if method == "session.logout":
                if len(params) != 1:
                    raise XapiError(E.MESSAGE_PARAMETER_COUNT_MISMATCH, method, 1, len(params))
                self._session(params[0])
                self.invalidate_session(params[0])
                return ""
            return self.dispatch(method, params)
        finally:
            self._local.session = None
