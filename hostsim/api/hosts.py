"""host and pool: the methods of XAPI's host class (and the home of pool, PBD and the other
per-host classes when hostsim simulates a pool of several hosts).

Today a pool is one master host (hostsim/host.py builds its records); `host.call_plugin` runs
the host's XAPI plugins (hostsim/plugins.py: the agent's fastpath plugin) and
`host.get_server_certificate` answers the host's TLS certificate.
"""

from hostsim import errors as E
from hostsim.errors import XapiError

API_VERSION_MAJOR = 2
API_VERSION_MINOR = 21


class HostMethods:
    """host.* (a mixin of hostsim.api.Xapi)."""

    def host__get_server_certificate(self, host):
        self.store.get("host", host)
        return self.certificate_pem

    def host__call_plugin(self, host, plugin, fn, args):
        self.store.get("host", host)
        if self.plugins is None:
            raise XapiError(E.XENAPI_MISSING_PLUGIN, plugin)
        return self.plugins.call(self._current_session_ref, plugin, fn, args)
