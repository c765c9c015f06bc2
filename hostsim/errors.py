"""XAPI failures as hostsim raises them: a code and string parameters, like XAPI's Server_error."""


class XapiError(Exception):
    """A XAPI failure; on the wire `{"Status": "Failure", "ErrorDescription": [code, *params]}`."""

    def __init__(self, code, *params):
        self.code = code
        self.params = [str(p) for p in params]
        super().__init__(" ".join([code, *self.params]))

    @property
    def description(self):
        return [self.code, *self.params]


HANDLE_INVALID = "HANDLE_INVALID"
SESSION_INVALID = "SESSION_INVALID"
SESSION_AUTHENTICATION_FAILED = "SESSION_AUTHENTICATION_FAILED"
HOST_IS_SLAVE = "HOST_IS_SLAVE"
UUID_INVALID = "UUID_INVALID"
MESSAGE_METHOD_UNKNOWN = "MESSAGE_METHOD_UNKNOWN"
MESSAGE_PARAMETER_COUNT_MISMATCH = "MESSAGE_PARAMETER_COUNT_MISMATCH"
FIELD_TYPE_ERROR = "FIELD_TYPE_ERROR"
VDI_IN_USE = "VDI_IN_USE"
VDI_NO_CBT_METADATA = "VDI_NO_CBT_METADATA"
VDI_INCOMPATIBLE_TYPE = "VDI_INCOMPATIBLE_TYPE"
VDI_MISSING = "VDI_MISSING"
OPERATION_NOT_ALLOWED = "OPERATION_NOT_ALLOWED"
VM_BAD_POWER_STATE = "VM_BAD_POWER_STATE"
VM_IS_TEMPLATE = "VM_IS_TEMPLATE"
EVENT_FROM_TOKEN_PARSE_FAILURE = "EVENT_FROM_TOKEN_PARSE_FAILURE"
EVENT_SUBSCRIPTION_PARSE_FAILURE = "EVENT_SUBSCRIPTION_PARSE_FAILURE"
XENAPI_MISSING_PLUGIN = "XENAPI_MISSING_PLUGIN"
XENAPI_PLUGIN_FAILURE = "XENAPI_PLUGIN_FAILURE"
TASK_CANCELLED = "TASK_CANCELLED"
INTERNAL_ERROR = "INTERNAL_ERROR"
VDIS_ON_DIFFERENT_SRS = "VDIS_ON_DIFFERENT_SRS"
# SM failures are SR_BACKEND_FAILURE_<code> [code, message, detail] (SM's XE_SR_ERRORCODES).
SR_BACKEND_FAILURE = "SR_BACKEND_FAILURE_"


def sr_backend_failure(code, message, detail=""):
    return XapiError("%s%d" % (SR_BACKEND_FAILURE, code), "", message, detail)
