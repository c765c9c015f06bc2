"""Stand-in for dom0's XenAPI module: xapi_local() is a session on XAPI's unix socket.

The plugin tests put this directory on the plugin's PYTHONPATH after hostsim/plugin_shim (the
XenAPIPlugin shim, shared with hostsim), whose dispatch hands the plugin xapi_local().

There is no XAPI on the test machine: as on a host whose xapi is down, every call fails with the
socket error the real module would raise (the plugin must fall back, not crash).
"""

XAPI_SOCKET = "/var/lib/xcp/xapi"


class _Method(object):
    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        return _Method(self._name + "." + name)

    def __call__(self, *args):
        raise FileNotFoundError(
            2, "No such file or directory: %s (calling %s)" % (XAPI_SOCKET, self._name)
        )


class Session(object):
    def __init__(self, uri):
        self.uri = uri
        self._session = None
        self.xenapi = _Method("xenapi")


def xapi_local():
    return Session("http://_var_lib_xcp_xapi/")
