"""XAPI's method surface over the Store: the `Xapi` object of one simulated pool.

`Xapi.dispatch(method, params)` takes an XML-RPC call as XAPI receives it (session reference
first, except for login) and returns a Python value or raises XapiError; `Xapi.call()` is what
the XML-RPC server (hostsim/server.py) calls. Marshalling to XAPI's wire types (int64 as
strings) happens in `wire()`. Storage operations go to an SR backend (hostsim.sm.FileSR), one
per SR, looked up by SR uuid.

`Xapi` is assembled from one mixin per XAPI class family, one file each:

    core.py      state, dispatch, sessions, generic getters/setters (get_record, get_<field>...)
    marshal.py   wire(), constructor-record checks (unmarshal_field/_record, REQUIRED)
    tasks.py     task, Async.* calls, event.from/inject, message
    hosts.py     host (call_plugin per host, get_server_certificate), placement (PBDs)
    vm.py        VM: VM_CREATE_FIELDS, vm_defaults(), create/start/shutdown/snapshot/clone/destroy
    vbd.py       VBD: create/destroy and the VM<->VDI links
    storage.py   SR and VDI: create/snapshot/clone/destroy, CBT, get_nbd_info, SR.scan
    network.py   network and VIF: create/destroy, MACs

A new class family (Network and VIF, say) is a new module with a `<Name>Methods` class whose
methods are named `<class>__<method>` (`vif__create`), added to `Xapi`'s bases below; its
class name goes into hostsim.store.CLASSES (and EVENT_CLASSES when clients watch it), which
also gives it the generic getters and setters.
"""

from hostsim.api.core import MAP_FIELDS, SETTABLE, Core, Session
from hostsim.api.hosts import API_VERSION_MAJOR, API_VERSION_MINOR, HostMethods
from hostsim.api.marshal import (
    REQUIRED,
    as_int,
    field_not_found,
    unmarshal_field,
    unmarshal_record,
    wire,
)
from hostsim.api.network import NetworkMethods
from hostsim.api.storage import VDIMethods, vdi_defaults
from hostsim.api.tasks import TaskMethods
from hostsim.api.vbd import VBDMethods
from hostsim.api.vm import (
    DOMAIN_TYPES,
    ON_CRASH,
    ON_NORMAL_EXIT,
    VM_CREATE_FIELDS,
    VMMethods,
    vm_defaults,
)


class Xapi(Core, TaskMethods, HostMethods, VMMethods, VBDMethods, VDIMethods, NetworkMethods):
    """The API of one simulated pool (its master answers for every host, as XAPI does)."""


__all__ = [
    "API_VERSION_MAJOR",
    "API_VERSION_MINOR",
    "DOMAIN_TYPES",
    "MAP_FIELDS",
    "ON_CRASH",
    "ON_NORMAL_EXIT",
    "REQUIRED",
    "SETTABLE",
    "VM_CREATE_FIELDS",
    "Session",
    "Xapi",
    "as_int",
    "field_not_found",
    "unmarshal_field",
    "unmarshal_record",
    "vdi_defaults",
    "vm_defaults",
    "wire",
]
