"""host.call_plugin as XAPI does it: run /etc/xapi.d/plugins/<name> with the call as argv[1]."""

import os
import subprocess
import sys
import xmlrpc.client

from hostsim import errors as E
from hostsim.errors import XapiError

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin_shim")
PLUGIN_TIMEOUT = 300


class PluginRunner:
    def __init__(self, plugin_dirs, xapi_url=None, env=None, python=None, timeout=PLUGIN_TIMEOUT):
        if isinstance(plugin_dirs, str):
            plugin_dirs = [plugin_dirs]
        self.plugin_dirs = list(plugin_dirs)
        self.xapi_url = xapi_url
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.timeout = timeout
        self.calls = []  # (plugin, fn, args) for tests

    def find(self, plugin):
        if not plugin or "/" in plugin or plugin.startswith("."):
            return None
        for d in self.plugin_dirs:
            path = os.path.join(d, plugin)
            if os.path.isfile(path):
                return path
        return None

    def call(self, session_ref, plugin, fn, args):
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            raise XapiError(E.FIELD_TYPE_ERROR, "args")
        path = self.find(plugin)
        if path is None:
            raise XapiError(E.XENAPI_MISSING_PLUGIN, plugin)
        self.calls.append((plugin, fn, dict(args)))
        request = xmlrpc.client.dumps((session_ref or "", args), fn)
        env = dict(os.environ)
        env.update(self.env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([SHIM_DIR, root, env.get("PYTHONPATH", "")])
        if self.xapi_url:
            env["HOSTSIM_XAPI_URL"] = self.xapi_url
        try:
            proc = subprocess.run(
                [self.python, path, request],
                capture_output=True,
                timeout=self.timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise XapiError(
                E.XENAPI_PLUGIN_FAILURE,
                fn,
                "timeout",
                "plugin %s ran over %ds" % (plugin, self.timeout),
            ) from None
        if proc.returncode != 0:
            raise XapiError(
                E.XENAPI_PLUGIN_FAILURE,
                fn,
                "exit %d" % proc.returncode,
                proc.stderr.decode(errors="replace")[-2000:],
            )
        try:
            (response,), _ = xmlrpc.client.loads(proc.stdout)
        except Exception:
            raise XapiError(
                E.XENAPI_PLUGIN_FAILURE,
                fn,
                "bad output",
                proc.stdout.decode(errors="replace")[-2000:],
            ) from None
        if response.get("Status") == "Success":
            return response.get("Value", "")
        raise XapiError(*response.get("ErrorDescription", [E.XENAPI_PLUGIN_FAILURE, fn]))
