"""hostsim's stand-in for dom0's XenAPIPlugin module (same interface as XAPI's python3 version).

XAPI runs a plugin as `<plugin> <xml-rpc methodCall>`; `dispatch(table)` decodes the call
(session_id, args), runs table[fn](session, args) and prints the XML-RPC methodResponse that XAPI
relays to the caller. Here `session` is a XenAPI.Session pointed at hostsim (HOSTSIM_XAPI_URL), logged
in with the caller's session reference, instead of the local unix socket.
"""

import os
import sys
import xmlrpc.client as xmlrpclib


class Failure(Exception):
    """Raise this to return a XAPI failure [code, *params] to the caller."""

    def __init__(self, code, params):
        Exception.__init__(self)
        if not isinstance(params, list):
            raise Exception("Failure: params must be a list")
        self.params = [code] + [str(p) for p in params]

    def __str__(self):
        return str(self.params)


def success_message(result):
    return xmlrpclib.dumps(({"Status": "Success", "Value": result},), "", True)


def failure_message(description):
    return xmlrpclib.dumps(({"Status": "Failure", "ErrorDescription": description},), "", True)


def _session(session_id):
    try:
        import XenAPI
    except ImportError:
        return None
    url = os.environ.get("HOSTSIM_XAPI_URL")
    if not url:
        return None
    s = XenAPI.Session(url)
    s._session = session_id
    return s


def dispatch(fn_table):
    if len(sys.argv) != 2:
        raise Exception("Incorrect number of commandline arguments")
    params, methodname = xmlrpclib.loads(sys.argv[1])
    session_id = params[0]
    args = params[1]
    if methodname in fn_table:
        x = _session(session_id)
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
