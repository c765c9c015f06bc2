"""Stand-in for dom0's XenAPIPlugin module, faithful to xen-api scripts/examples/python/XenAPIPlugin.py.

The one shim for every place that runs a plugin file off a real host: hostsim's host.call_plugin
(hostsim/plugins.py) and the plugin tests (tests/plugin, tests/dom0), which put this directory on
the plugin's PYTHONPATH.

XAPI (ocaml/xapi/xapi_plugins.ml, call_plugin) executes /etc/xapi.d/plugins/<name> with ONE argument:
the XML-RPC methodCall <fn>(session_ref, {args: strings}). The plugin prints an XML-RPC
methodResponse holding {"Status": "Success", "Value": <string>} or {"Status": "Failure",
"ErrorDescription": [code, params...]}; XAPI turns a non-zero exit into XENAPI_PLUGIN_FAILURE.

The session handed to the functions carries the caller's session id. On a host it is
XenAPI.xapi_local() (XAPI's unix socket), and so it is here, with whichever XenAPI module comes
first on the path (tests/plugin/shim has one for a host whose XAPI is down). Under hostsim,
HOSTSIM_XAPI_URL names the simulated XAPI instead, and the session is XenAPI.Session(that URL).
"""

import os
import sys
import xmlrpc.client as xmlrpclib

import XenAPI


class Failure(Exception):
    """Provide compatibility with plugins written against XenServer 5.5 API."""

    def __init__(self, code, params):
        Exception.__init__(self)
        self.params = [code] + params

    def __str__(self):
        return str(self.params)


def success_message(result):
    rpcparams = {"Status": "Success", "Value": result}
    return xmlrpclib.dumps((rpcparams,), "", True)


def failure_message(description):
    rpcparams = {"Status": "Failure", "ErrorDescription": description}
    return xmlrpclib.dumps((rpcparams,), "", True)


def _session():
    url = os.environ.get("HOSTSIM_XAPI_URL")
    return XenAPI.Session(url) if url else XenAPI.xapi_local()


def dispatch(fn_table):
    if len(sys.argv) != 2:
        raise Exception("Incorrect number of commandline arguments")
    params, methodname = xmlrpclib.loads(sys.argv[1])
    session_id = params[0]
    args = params[1]
    if methodname in fn_table:
        x = _session()
        x._session = session_id
        try:
            result = fn_table[methodname](x, args)
            print(success_message(result))
        except SystemExit:
            raise
        except Failure as e:
            print(failure_message(e.params))
        except Exception as e:
            print(
                failure_message(["XENAPI_PLUGIN_FAILURE", methodname, e.__class__.__name__, str(e)])
            )
    else:
        print(failure_message(["UNKNOWN_XENAPI_PLUGIN_FUNCTION", methodname]))
