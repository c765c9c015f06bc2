"""XAPI's method surface over the Store: sessions, generic getters, VM/VDI operations, tasks, events.

`Xapi.dispatch(method, params)` takes an XML-RPC call as XAPI receives it (session reference first,
except for login) and returns a Python value or raises XapiError. Marshalling to XAPI's wire types
(int64 as strings) happens in `wire()`. Storage operations go to an SR backend (hostsim.sm.FileSR),
one per SR, looked up by SR uuid.
"""

import base64
import copy
import inspect
import logging
import threading
import time

from hostsim import errors as E
from hostsim.errors import XapiError
from hostsim.store import EVENT_CLASSES, LOWER, NULL_REF, Store, new_uuid, xapi_time

log = logging.getLogger("hostsim.api")

API_VERSION_MAJOR = 2
API_VERSION_MINOR = 21

MAP_FIELDS = ("other_config", "sm_config", "xenstore_data", "device_config", "blocked_operations")
SETTABLE = ("name_label", "name_description", "other_config", "tags", "blocked_operations")


def wire(value):
    """XAPI's XML-RPC encoding: int64 travel as strings; bool, float, str, lists, maps as such."""
    if isinstance(value, bool) or value is None:
        return value if value is not None else ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return {str(k): wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [wire(v) for v in value]
    return value


def as_int(value, field="value"):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise XapiError(E.FIELD_TYPE_ERROR, field) from None


# XAPI error codes used only here (Api_errors in xen-api's ocaml/xapi-consts/api_errors.ml).
INVALID_VALUE = "INVALID_VALUE"
VALUE_NOT_SUPPORTED = "VALUE_NOT_SUPPORTED"
DEVICE_ALREADY_EXISTS = "DEVICE_ALREADY_EXISTS"
INVALID_DEVICE = "INVALID_DEVICE"
VBD_CDS_MUST_BE_READONLY = "VBD_CDS_MUST_BE_READONLY"
VBD_NOT_REMOVABLE_MEDIA = "VBD_NOT_REMOVABLE_MEDIA"
VDI_READONLY = "VDI_READONLY"
VM_BIOS_STRINGS_ALREADY_SET = "VM_BIOS_STRINGS_ALREADY_SET"


def field_not_found(name):
    """What XAPI answers for a constructor record without a required field: the dispatcher's
    Dispatcher_FieldNotFound exception, printed into INTERNAL_ERROR."""
    return XapiError(E.INTERNAL_ERROR, 'Server_helpers.Dispatcher_FieldNotFound("%s")' % name)


def unmarshal_field(cls, name, ty, value):
    """One field of a constructor record, checked like XAPI's generated *_of_rpc functions.

    int64 travel as strings (or XML-RPC <int>), enums as their names (case-insensitive), maps
    are string -> string, sets lists of strings, refs strings. A value of the wrong type fails
    inside XAPI's unmarshaller, which the dispatcher reports as INTERNAL_ERROR; hostsim's text
    names the class, the field and the expected type.
    """

    def bad(expected):
        return XapiError(
            E.INTERNAL_ERROR,
            "Unmarshalling error: %s.%s expects %s, got %r" % (cls, name, expected, value),
        )

    if isinstance(ty, tuple):
        if isinstance(value, str) and value.lower() in ty:
            return value.lower()
        raise bad("one of " + "|".join(ty))
    if ty in ("string", "ref"):
        if isinstance(value, str):
            return value
        raise bad(ty)
    if ty == "int":
        if isinstance(value, bool):
            raise bad("int64")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad("int64") from None
    if ty == "float":
        if isinstance(value, bool):
            raise bad("float")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("float") from None
    if ty == "bool":
        if isinstance(value, bool):
            return value
        raise bad("bool")
    if ty == "map":
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        raise bad("(string -> string) map")
    if ty == "set":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad("string set")
    raise AssertionError(ty)


# -- VM.create: XAPI's constructor record ------------------------------------------------------
#
# XAPI (ocaml/idl/datamodel_vm.ml, the VM class; xapi-project/xen-api) generates VM.create from
# the VM fields that are not DynamicRO: each is read from the <struct> by
# Server_helpers.my_assoc, which raises Dispatcher_FieldNotFound for a field that has no
# ~default_value (ocaml/idl/ocaml_backend/gen_server.ml, server_helpers.ml); the dispatcher turns
# that exception into INTERNAL_ERROR [Printexc.to_string exn] (exnHelper.ml), i.e.
# ["INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("user_version")'].  Fields the
# struct has but the datamodel does not know are ignored.  Xapi_vm.create then adds a random
# other_config:mac_seed when none is given, derives domain_type from HVM_boot_policy when it is
# "unspecified", and creates the VM Halted; "parameter validation is delayed until VM.start"
# (xapi_vm.ml), where Xapi_vm_helpers.validate_basic_parameters checks VCPUs and memory.
#
# name -> (type, default); REQUIRED marks the fields without a default.
REQUIRED = object()
ON_NORMAL_EXIT = ("destroy", "restart")
ON_CRASH = (
    "destroy",
    "coredump_and_destroy",
    "restart",
    "coredump_and_restart",
    "preserve",
    "rename_restart",
)
DOMAIN_TYPES = ("hvm", "pv", "pv_in_pvh", "pvh", "unspecified")
VM_CREATE_FIELDS = {
    "name_label": ("string", REQUIRED),
    "name_description": ("string", REQUIRED),
    "user_version": ("int", REQUIRED),
    "is_a_template": ("bool", REQUIRED),
    "affinity": ("ref", REQUIRED),
    "memory_target": ("int", 0),
    "memory_static_max": ("int", REQUIRED),
    "memory_dynamic_max": ("int", REQUIRED),
    "memory_dynamic_min": ("int", REQUIRED),
    "memory_static_min": ("int", REQUIRED),
    "VCPUs_params": ("map", REQUIRED),
    "VCPUs_max": ("int", REQUIRED),
    "VCPUs_at_startup": ("int", REQUIRED),
    "actions_after_shutdown": (ON_NORMAL_EXIT, REQUIRED),
    "actions_after_reboot": (ON_NORMAL_EXIT, REQUIRED),
    "actions_after_crash": (ON_CRASH, REQUIRED),
    "PV_bootloader": ("string", REQUIRED),
    "PV_kernel": ("string", REQUIRED),
    "PV_ramdisk": ("string", REQUIRED),
    "PV_args": ("string", REQUIRED),
    "PV_bootloader_args": ("string", REQUIRED),
    "PV_legacy_args": ("string", REQUIRED),
    "HVM_boot_policy": ("string", REQUIRED),
    "HVM_boot_params": ("map", REQUIRED),
    "HVM_shadow_multiplier": ("float", 1.0),
    "platform": ("map", REQUIRED),
    "PCI_bus": ("string", REQUIRED),
    "other_config": ("map", REQUIRED),
    "recommendations": ("string", REQUIRED),
    "xenstore_data": ("map", {}),
    "ha_always_run": ("bool", False),
    "ha_restart_priority": ("string", ""),
    "tags": ("set", []),
    "blocked_operations": ("map", {}),
    "protection_policy": ("ref", NULL_REF),
    "is_snapshot_from_vmpp": ("bool", False),
    "snapshot_schedule": ("ref", NULL_REF),
    "is_vmss_snapshot": ("bool", False),
    "appliance": ("ref", NULL_REF),
    "start_delay": ("int", 0),
    "shutdown_delay": ("int", 0),
    "order": ("int", 0),
    "suspend_SR": ("ref", NULL_REF),
    "version": ("int", 0),
    "generation_id": ("string", "0:0"),
    "hardware_platform_version": ("int", 0),
    "has_vendor_device": ("bool", False),
    "reference_label": ("string", ""),
    "domain_type": (DOMAIN_TYPES, "unspecified"),
    "NVRAM": ("map", {}),
}


def vm_defaults(**kw):
    """A complete VM record as XAPI's database holds one: VM.create's fields (XAPI's defaults,
    and for the fields without one the values of a plain 1 GiB, 1 vCPU HVM guest) plus the
    DynamicRO fields XAPI fills itself."""
    rec = {}
    for name, (_ty, default) in VM_CREATE_FIELDS.items():
        if default is not REQUIRED:
            rec[name] = copy.deepcopy(default)
    rec.update(
        {
            "uuid": new_uuid(),
            "name_label": "",
            "name_description": "",
            "user_version": 1,
            "is_a_template": False,
            "affinity": NULL_REF,
            "memory_target": 1 << 30,
            "memory_static_max": 1 << 30,
            "memory_dynamic_max": 1 << 30,
            "memory_dynamic_min": 1 << 30,
            "memory_static_min": 1 << 29,
            "VCPUs_params": {},
            "VCPUs_max": 1,
            "VCPUs_at_startup": 1,
            "actions_after_shutdown": "destroy",
            "actions_after_reboot": "restart",
            "actions_after_crash": "restart",
            "PV_bootloader": "",
            "PV_kernel": "",
            "PV_ramdisk": "",
            "PV_args": "",
            "PV_bootloader_args": "",
            "PV_legacy_args": "",
            "HVM_boot_policy": "BIOS order",
            "HVM_boot_params": {"order": "cdn"},
            "platform": {"acpi": "1", "apic": "true", "pae": "true", "nx": "true"},
            "PCI_bus": "",
            "other_config": {},
            "recommendations": "",
            "domain_type": "hvm",
            # DynamicRO: what XAPI sets, never the caller
            "power_state": "Halted",
            "is_default_template": False,
            "is_a_snapshot": False,
            "is_control_domain": False,
            "snapshot_of": NULL_REF,
            "snapshots": [],
            "snapshot_time": xapi_time(0),
            "snapshot_info": {},
            "snapshot_metadata": "",
            "transportable_snapshot_id": "",
            "parent": NULL_REF,
            "children": [],
            "suspend_VDI": NULL_REF,
            "resident_on": NULL_REF,
            "memory_overhead": 0,
            "VBDs": [],
            "VIFs": [],
            "VUSBs": [],
            "VGPUs": [],
            "VTPMs": [],
            "consoles": [],
            "crash_dumps": [],
            "attached_PCIs": [],
            "domid": -1,
            "domarch": "",
            "last_boot_CPU_flags": {},
            "metrics": NULL_REF,
            "guest_metrics": NULL_REF,
            "last_booted_record": "",
            "blobs": {},
            "bios_strings": {},
            "requires_reboot": False,
            "allowed_operations": [],
            "current_operations": {},
        }
    )
    rec.update(kw)
    return rec


def vdi_defaults(**kw):
    rec = {
        "uuid": new_uuid(),
        "name_label": "",
        "name_description": "",
        "SR": NULL_REF,
        "VBDs": [],
        "virtual_size": 0,
        "physical_utilisation": 0,
        "type": "user",
        "sharable": False,
        "read_only": False,
        "managed": True,
        "missing": False,
        "is_a_snapshot": False,
        "snapshot_of": NULL_REF,
        "snapshots": [],
        "snapshot_time": xapi_time(0),
        "sm_config": {},
        "other_config": {},
        "xenstore_data": {},
        "cbt_enabled": False,
        "location": "",
        "parent": NULL_REF,
        "storage_lock": False,
        "on_boot": "persist",
        "allow_caching": False,
        "metadata_of_pool": NULL_REF,
        "metadata_latest": False,
        "is_tools_iso": False,
        "tags": [],
        "allowed_operations": [],
        "current_operations": {},
    }
    rec.update(kw)
    return rec


class Session:
    __slots__ = ("ref", "user", "valid")

    def __init__(self, ref, user):
        self.ref = ref
        self.user = user
        self.valid = True


class Xapi:
    """The API of one simulated pool (one master host)."""

    def __init__(self, store=None, user="root", password="hostsim"):
        self.store = store or Store()
        self.user = user
        self.password = password
        self.sessions = {}
        self.srs = {}  # SR uuid -> backend
        self.plugins = None  # hostsim.plugins.PluginRunner
        self.nbd_address = None  # (host, port) of the xapi-nbd endpoint
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
                if session_ref is not None and not self.sessions.get(session_ref, _DEAD).valid:
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

    # -- pool / host ---------------------------------------------------------------------------

    def host__get_server_certificate(self, host):
        self.store.get("host", host)
        return self.certificate_pem

    def host__call_plugin(self, host, plugin, fn, args):
        self.store.get("host", host)
        if self.plugins is None:
            raise XapiError(E.XENAPI_MISSING_PLUGIN, plugin)
        return self.plugins.call(self._current_session_ref, plugin, fn, args)

    def sr__scan(self, sr):
        backend = self.sr_backend(sr)
        backend.gc_once()
        return ""

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

    # -- VBD -----------------------------------------------------------------------------------

    def vbd__create(self, record):
        """XAPI's VBD.create (xapi_vbd.ml): the VDI's type must be attachable, CDs are read-only,
        only CDs may be empty, no RW VBD on a read-only VDI, userdevice unique in the VM."""
        if not isinstance(record, dict):
            raise XapiError(E.INTERNAL_ERROR, 'Failure("bad __structure")')
        vm = record.get("VM", NULL_REF)
        vdi = record.get("VDI", NULL_REF)
        vm_rec = self.store.get("VM", vm)
        vbd_type = record.get("type", "Disk")
        mode = record.get("mode", "RW")
        empty = bool(record.get("empty", vdi == NULL_REF))
        userdevice = str(record.get("userdevice", "0"))
        vdi_rec = None
        if not empty or vdi != NULL_REF:
            vdi_rec = self.store.get("VDI", vdi)
        if not empty and vdi_rec["type"] == "cbt_metadata":
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, vdi_rec["type"])
        if vbd_type == "CD" and mode != "RO":
            raise XapiError(VBD_CDS_MUST_BE_READONLY)
        if vbd_type != "CD" and empty:
            raise XapiError(VBD_NOT_REMOVABLE_MEDIA, "in constructor")
        if mode == "RW" and vdi_rec is not None and vdi_rec["read_only"]:
            raise XapiError(VDI_READONLY, vdi)
        if not userdevice.isdigit():
            raise XapiError(INVALID_DEVICE, userdevice)
        for other in vm_rec["VBDs"]:
            if self.store.field("VBD", other, "userdevice") == userdevice:
                raise XapiError(DEVICE_ALREADY_EXISTS, userdevice)
        return self._new_vbd(
            vm,
            vdi,
            userdevice=userdevice,
            mode=mode,
            bootable=bool(record.get("bootable", False)),
            vbd_type=vbd_type,
            empty=empty,
            unpluggable=bool(record.get("unpluggable", True)),
            other_config=dict(record.get("other_config", {})),
        )

    def _new_vbd(
        self,
        vm,
        vdi,
        userdevice="0",
        mode="RW",
        bootable=False,
        vbd_type="Disk",
        empty=None,
        unpluggable=True,
        other_config=None,
    ):
        running = self.store.field("VM", vm, "power_state") == "Running"
        ref = self.store.add(
            "VBD",
            {
                "VM": vm,
                "VDI": vdi,
                "device": "xvd" + chr(ord("a") + int(userdevice)) if userdevice.isdigit() else "",
                "userdevice": userdevice,
                "mode": mode,
                "type": vbd_type,
                "bootable": bootable,
                "empty": vdi == NULL_REF if empty is None else empty,
                "unpluggable": unpluggable,
                "currently_attached": running,
                "other_config": other_config or {},
                "allowed_operations": [],
                "current_operations": {},
            },
        )
        self.store.list_add("VM", vm, "VBDs", ref)
        if vdi != NULL_REF:
            self.store.list_add("VDI", vdi, "VBDs", ref)
        return ref

    def vbd__destroy(self, vbd):
        rec = self.store.get("VBD", vbd)
        if rec["currently_attached"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "VBD is currently attached")
        self._drop_vbd(vbd, rec)
        return ""

    def _drop_vbd(self, vbd, rec):
        self.store.list_remove("VM", rec["VM"], "VBDs", vbd)
        if rec["VDI"] != NULL_REF:
            self.store.list_remove("VDI", rec["VDI"], "VBDs", vbd)
        self.store.delete("VBD", vbd)

    # -- VM ------------------------------------------------------------------------------------

    def vm__create(self, record):
        """XAPI's VM.create: every field of VM_CREATE_FIELDS without a default is required (the
        first missing one, in datamodel order, is named in XAPI's INTERNAL_ERROR), unknown
        fields are ignored, a random other_config:mac_seed is added when absent, domain_type
        "unspecified" is derived from HVM_boot_policy, and the VM is Halted. Values are not
        validated here (XAPI: "parameter validation is delayed until VM.start")."""
        if not isinstance(record, dict):
            raise XapiError(E.INTERNAL_ERROR, 'Failure("bad __structure")')
        fields = {}
        for name, (ty, default) in VM_CREATE_FIELDS.items():
            if name in record:
                fields[name] = unmarshal_field("VM", name, ty, record[name])
            elif default is REQUIRED:
                raise field_not_found(name)
            else:
                fields[name] = copy.deepcopy(default)
        fields["other_config"].setdefault("mac_seed", new_uuid())
        if fields["domain_type"] == "unspecified":
            fields["domain_type"] = "pv" if fields["HVM_boot_policy"] == "" else "hvm"
        return self.store.add("VM", vm_defaults(**fields))

    def _validate_basic_parameters(self, vm, rec):
        """Xapi_vm_helpers.validate_basic_parameters, run by VM.start: VCPUs, shadow multiplier,
        actions_after_crash. (Memory constraints are coerced there, so they rarely fail.)"""
        vmax, vstart = rec["VCPUs_max"], rec["VCPUs_at_startup"]
        if vmax < 1:
            raise XapiError(INVALID_VALUE, "VCPUs_max", vmax)
        if vstart < 1:
            raise XapiError(INVALID_VALUE, "VCPUs-at-startup", vstart)
        if vstart > vmax:
            raise XapiError(
                VALUE_NOT_SUPPORTED, "VCPUs-at-startup", vstart, "value greater than VCPUs-max"
            )
        if rec["HVM_shadow_multiplier"] < 1.0:
            raise XapiError(INVALID_VALUE, "HVM_shadow_multiplier", rec["HVM_shadow_multiplier"])
        crash = rec["actions_after_crash"]
        if crash == "rename_restart":
            raise XapiError(
                VALUE_NOT_SUPPORTED,
                "VM.actions_after_crash",
                crash,
                "option would leak a domain; VMs and not domains are managed by this API",
            )
        if crash.startswith("coredump") and rec["domain_type"] != "pv":
            raise XapiError(
                VALUE_NOT_SUPPORTED,
                "VM.actions_after_crash",
                crash,
                "cannot invoke a coredump of an HVM, PVH or PV-in-PVH domain",
            )

    def vm__set_bios_strings(self, vm, value):
        """XAPI's VM.set_bios_strings: only once (VM_BIOS_STRINGS_ALREADY_SET), a Halted VM,
        string values of at most 512 characters."""
        rec = self.store.get("VM", vm)
        if rec["bios_strings"]:
            raise XapiError(VM_BIOS_STRINGS_ALREADY_SET)
        if rec["power_state"] != "Halted":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", rec["power_state"].lower())
        value = unmarshal_field("VM", "bios_strings", "map", value)
        for k, v in value.items():
            if len(v) > 512:
                raise XapiError(INVALID_VALUE, k, "length exceeds 512 characters")
        self.store.update("VM", vm, bios_strings=value)
        return ""

    def vm__start(self, vm, start_paused, force):
        rec = self.store.get("VM", vm)
        if rec["is_a_template"] or rec["is_a_snapshot"]:
            raise XapiError(E.VM_IS_TEMPLATE, vm, "start")
        if rec["power_state"] != "Halted":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", rec["power_state"].lower())
        self._validate_basic_parameters(vm, rec)
        self._set_power(vm, "Running")
        return ""

    def _set_power(self, vm, state):
        self.store.update(
            "VM",
            vm,
            power_state=state,
            resident_on=self.host_ref if state == "Running" else NULL_REF,
        )
        for vbd in self.store.field("VM", vm, "VBDs"):
            self.store.update("VBD", vbd, currently_attached=state == "Running")

    def _shutdown(self, vm):
        rec = self.store.get("VM", vm)
        if rec["power_state"] != "Running":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "running", rec["power_state"].lower())
        self._set_power(vm, "Halted")
        return ""

    def vm__clean_shutdown(self, vm):
        return self._shutdown(vm)

    def vm__hard_shutdown(self, vm):
        return self._shutdown(vm)

    def vm__snapshot(self, vm, new_name):
        return self._copy_vm(vm, new_name, snapshot=True)

    def vm__clone(self, vm, new_name):
        rec = self.store.get("VM", vm)
        if rec["power_state"] != "Halted":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", rec["power_state"].lower())
        return self._copy_vm(vm, new_name, snapshot=False)

    def _copy_vm(self, vm, new_name, snapshot):
        rec = self.store.get("VM", vm)
        if snapshot and rec["is_a_snapshot"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "cannot snapshot a snapshot")
        vbds = [(vbd, self.store.get("VBD", vbd)) for vbd in rec["VBDs"]]
        disks = []
        for _vbd, vrec in vbds:
            if vrec["VDI"] == NULL_REF or vrec["type"] != "Disk":
                continue
            new_vdi = self._copy_vdi(vrec["VDI"], snapshot=snapshot)
            disks.append((new_vdi, vrec))
        now = xapi_time()
        config = {k: copy.deepcopy(rec[k]) for k in VM_CREATE_FIELDS if k in rec}
        config.update(
            name_label=new_name,
            is_a_template=snapshot or rec["is_a_template"],
            is_a_snapshot=snapshot,
            snapshot_of=vm if snapshot else NULL_REF,
            snapshot_time=now if snapshot else xapi_time(0),
            parent=vm if not snapshot else rec["parent"],
            bios_strings=copy.deepcopy(rec.get("bios_strings", {})),
        )
        fields = vm_defaults(**config)
        new_vm = self.store.add("VM", fields)
        for new_vdi, vrec in disks:
            self._new_vbd(
                new_vm,
                new_vdi,
                vrec["userdevice"],
                vrec["mode"],
                vrec["bootable"],
                vbd_type=vrec["type"],
                unpluggable=vrec.get("unpluggable", True),
                other_config=dict(vrec.get("other_config", {})),
            )
        if snapshot:
            self.store.list_add("VM", vm, "snapshots", new_vm)
        else:
            self.store.list_add("VM", vm, "children", new_vm)
        return new_vm

    def vm__destroy(self, vm):
        rec = self.store.get("VM", vm)
        if rec["power_state"] == "Running":
            raise XapiError(E.VM_BAD_POWER_STATE, vm, "halted", "running")
        for vbd in rec["VBDs"]:
            self._drop_vbd(vbd, self.store.get("VBD", vbd))
        if rec["snapshot_of"] != NULL_REF:
            self.store.list_remove("VM", rec["snapshot_of"], "snapshots", vm)
        if rec["parent"] != NULL_REF:
            self.store.list_remove("VM", rec["parent"], "children", vm)
        for snap in rec["snapshots"]:
            if self.store.exists("VM", snap):
                self.store.update("VM", snap, snapshot_of=NULL_REF)
        self.store.delete("VM", vm)
        return ""

    # -- VDI -----------------------------------------------------------------------------------

    def sr_backend(self, sr_ref):
        uuid = self.store.field("SR", sr_ref, "uuid")
        return self.srs[uuid]

    def _vdi_backend(self, vdi):
        return self.sr_backend(self.store.field("VDI", vdi, "SR"))

    def _active_vbds(self, vdi):
        out = []
        for vbd in self.store.field("VDI", vdi, "VBDs"):
            rec = self.store.get("VBD", vbd)
            if rec["currently_attached"]:
                out.append(rec)
        return out

    def vdi__create(self, record):
        sr = record.get("SR", NULL_REF)
        backend = self.sr_backend(sr)
        size = as_int(record.get("virtual_size", 0), "virtual_size")
        uuid = backend.create(size)
        return self.introduce_vdi(
            sr,
            uuid,
            name_label=record.get("name_label", ""),
            name_description=record.get("name_description", ""),
            type=record.get("type", "user"),
            sharable=bool(record.get("sharable", False)),
            read_only=bool(record.get("read_only", False)),
            other_config=dict(record.get("other_config", {})),
        )

    def introduce_vdi(self, sr, uuid, **fields):
        backend = self.sr_backend(sr)
        info = backend.info(uuid)
        rec = vdi_defaults(
            uuid=uuid,
            SR=sr,
            location=uuid,
            virtual_size=info["virtual_size"],
            physical_utilisation=info["physical_utilisation"],
            sm_config={"vhd-parent": info["parent"]} if info["parent"] else {},
            **fields,
        )
        ref = self.store.add("VDI", rec)
        self.store.list_add("SR", sr, "VDIs", ref)
        return ref

    def refresh_vdi(self, ref):
        """Re-read size, utilisation and vhd-parent of a VDI from its VHD file."""
        rec = self.store.get("VDI", ref)
        if rec["type"] == "cbt_metadata":
            return
        info = self._vdi_backend(ref).info(rec["uuid"])

        def fn(f):
            f["virtual_size"] = info["virtual_size"]
            f["physical_utilisation"] = info["physical_utilisation"]
            if info["parent"]:
                f["sm_config"]["vhd-parent"] = info["parent"]
            else:
                f["sm_config"].pop("vhd-parent", None)

        self.store.mutate("VDI", ref, fn)

    def _copy_vdi(self, vdi, snapshot):
        rec = self.store.get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, "cbt_metadata")
        if snapshot and rec["sharable"]:
            raise XapiError("VDI_IS_SHARABLE", vdi)
        backend = self._vdi_backend(vdi)
        with backend.lock:
            new_uuid_, base_uuid = backend.snapshot(
                rec["uuid"], cbt=snapshot and rec["cbt_enabled"]
            )
            sr = rec["SR"]
            if base_uuid is not None:
                self.introduce_vdi(
                    sr,
                    base_uuid,
                    name_label="base copy",
                    managed=False,
                    read_only=True,
                )
            now = xapi_time()
            new = self.introduce_vdi(
                sr,
                new_uuid_,
                name_label=rec["name_label"],
                name_description=rec["name_description"],
                type=rec["type"],
                read_only=rec["read_only"] if not snapshot else False,
                is_a_snapshot=snapshot,
                snapshot_of=vdi if snapshot else NULL_REF,
                snapshot_time=now if snapshot else xapi_time(0),
                cbt_enabled=rec["cbt_enabled"] if snapshot else False,
                other_config=dict(rec["other_config"]),
            )
            self.refresh_vdi(vdi)
            if snapshot:
                self.store.list_add("VDI", vdi, "snapshots", new)
        return new

    def vdi__snapshot(self, vdi, driver_params):
        return self._copy_vdi(vdi, snapshot=True)

    def vdi__clone(self, vdi, driver_params):
        return self._copy_vdi(vdi, snapshot=False)

    def vdi__destroy(self, vdi):
        rec = self.store.get("VDI", vdi)
        if self._active_vbds(vdi):
            raise XapiError(E.VDI_IN_USE, vdi, "destroy")
        backend = self._vdi_backend(vdi)
        with backend.lock:
            for vbd in rec["VBDs"]:
                self._drop_vbd(vbd, self.store.get("VBD", vbd))
            backend.destroy(rec["uuid"])
            self.forget_vdi(vdi)
        backend.kick_gc()
        return ""

    def forget_vdi(self, vdi):
        rec = self.store.get("VDI", vdi)
        if rec["snapshot_of"] != NULL_REF:
            self.store.list_remove("VDI", rec["snapshot_of"], "snapshots", vdi)
        for snap in rec["snapshots"]:
            if self.store.exists("VDI", snap):
                self.store.update("VDI", snap, snapshot_of=NULL_REF)
        self.store.list_remove("SR", rec["SR"], "VDIs", vdi)
        self.store.delete("VDI", vdi)

    def _check_cbt_change(self, vdi, rec):
        if rec["is_a_snapshot"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "VDI is a snapshot: " + vdi)
        if rec["type"] not in ("user", "system"):
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, rec["type"])

    def vdi__enable_cbt(self, vdi):
        rec = self.store.get("VDI", vdi)
        self._check_cbt_change(vdi, rec)
        if not rec["cbt_enabled"]:
            self._vdi_backend(vdi).enable_cbt(rec["uuid"])
            self.store.update("VDI", vdi, cbt_enabled=True)
        return ""

    def vdi__disable_cbt(self, vdi):
        rec = self.store.get("VDI", vdi)
        self._check_cbt_change(vdi, rec)
        if rec["cbt_enabled"]:
            self._vdi_backend(vdi).disable_cbt(rec["uuid"])
            self.store.update("VDI", vdi, cbt_enabled=False)
        return ""

    def vdi__list_changed_blocks(self, vdi_from, vdi_to):
        rec_from = self.store.get("VDI", vdi_from)
        rec_to = self.store.get("VDI", vdi_to)
        if rec_from["SR"] != rec_to["SR"]:
            raise XapiError(E.VDIS_ON_DIFFERENT_SRS, vdi_from, vdi_to)
        # XAPI's rule: refused while vdi_to is attached, unless only to VM snapshots.
        for vbd in self._active_vbds(vdi_to):
            if not self.store.field("VM", vbd["VM"], "is_a_snapshot"):
                raise XapiError(E.VDI_IN_USE, vdi_to, "list_changed_blocks")
        bitmap = self._vdi_backend(vdi_to).list_changed_blocks(rec_from["uuid"], rec_to["uuid"])
        return base64.b64encode(bitmap).decode("ascii")

    def vdi__data_destroy(self, vdi):
        rec = self.store.get("VDI", vdi)
        if not rec["is_a_snapshot"]:
            raise XapiError(E.OPERATION_NOT_ALLOWED, "VDI is not a snapshot: " + vdi)
        if not rec["cbt_enabled"]:
            raise XapiError(E.VDI_NO_CBT_METADATA, vdi)
        if rec["type"] == "cbt_metadata":
            return ""
        if self._active_vbds(vdi):
            raise XapiError(E.VDI_IN_USE, vdi, "data_destroy")
        backend = self._vdi_backend(vdi)
        with backend.lock:
            for vbd in rec["VBDs"]:
                self._drop_vbd(vbd, self.store.get("VBD", vbd))
            backend.data_destroy(rec["uuid"])
            self.store.mutate("VDI", vdi, _as_cbt_metadata)
        backend.kick_gc()
        return ""

    def vdi__get_nbd_info(self, vdi):
        rec = self.store.get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise XapiError(E.VDI_INCOMPATIBLE_TYPE, vdi, "cbt_metadata")
        if self.nbd_address is None:
            return []
        host, port = self.nbd_address
        return [
            {
                "exportname": "/%s?session_id=%s" % (rec["uuid"], self._current_session_ref),
                "address": host,
                "port": port,
                "cert": self.certificate_pem,
                "subject": self.cert_subject,
            }
        ]

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


class _Dead:
    valid = False


_DEAD = _Dead()


def _as_cbt_metadata(f):
    f["type"] = "cbt_metadata"
    f["physical_utilisation"] = 0
    f["sm_config"].pop("vhd-parent", None)


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
