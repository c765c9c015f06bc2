"""XAPI's wire types, both ways: `wire()` encodes a result for XML-RPC (int64 as strings), and
the constructor-record checks (`unmarshal_field`, `unmarshal_record`) decode what a client sent,
failing as XAPI's generated unmarshallers and dispatcher do. Shared by every class family.
"""

import copy

from hostsim import errors as E
from hostsim.errors import XapiError

# A constructor field table (name -> (type, default)) marks the fields without a default with
# this: a record missing one is refused (see `unmarshal_record`).
REQUIRED = object()


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


def unmarshal_record(cls, table, record):
    """A constructor's record (`<cls>.create`), read field by field as XAPI's generated server
    does: every field of `table` (name -> (type, default)) is taken from `record` and checked
    by `unmarshal_field`; a missing field gets its default, or, when it is REQUIRED, fails with
    the dispatcher's INTERNAL_ERROR naming the first one in table order. Fields the record has
    but the table does not know are ignored."""
    if not isinstance(record, dict):
        raise XapiError(E.INTERNAL_ERROR, 'Failure("bad __structure")')
    fields = {}
    for name, (ty, default) in table.items():
        if name in record:
            fields[name] = unmarshal_field(cls, name, ty, record[name])
        elif default is REQUIRED:
            raise field_not_found(name)
        else:
            fields[name] = copy.deepcopy(default)
    return fields
