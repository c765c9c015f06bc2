"""The agent's configuration: an INI file (configparser) overridden by command-line flags.

[agent]
sr_roots = /var/run/sr-mount            ; several: separated by commas or newlines
admin_socket = /run/fastpath/agent.sock
sm_lock_dir = /var/lock/sm              ; SM's locks; GC paused while exports are open (empty: never)
sm_ipc_dir = /var/run/sm/ipc            ; SM's IPC flags (the GC's abort flag)
gc_abort_timeout = 60                   ; seconds a running GC gets to abort before an open fails
sr_lock_timeout = 10                    ; seconds we wait for SM's `sr` lock (held only to open a chain)
[lvm]
enabled = auto                          ; LVM SRs (VG_XenStorage-*): yes | no | auto (when lvs exists)
lvs = lvs
lvchange = lvchange
dev_dir = /dev
[nbd]
listen = 0.0.0.0:10810                  ; 10809 belongs to xapi-nbd in the same dom0
max_connections = 256
max_inflight = 32
workers = 4                             ; per connection; 0 = serve in the reader thread
handshake_timeout = 5                   ; seconds a client gets to present its ticket (whole handshake)
idle_timeout = 300
list_exports = no
max_block_status_descriptors = 8192     ; per BLOCK_STATUS reply and context (clients ask again)
max_handshakes = 64                     ; connections still in their handshake (no ticket yet)
max_handshakes_per_address = 16         ; the same, per source address
[http]
listen = 0.0.0.0:8843
max_connections = 64
header_timeout = 10                     ; seconds to send a request's headers
idle_timeout = 60                       ; seconds a kept-alive connection may stay silent
send_timeout = 60                       ; seconds a client may stall reading a response
max_unauthenticated = 32                ; connections that have not presented a ticket
max_unauthenticated_per_address = 16    ; the same, per source address
unauthenticated_timeout = 5             ; seconds such a connection may stay silent
[tls]
mode = require                          ; off | optional | require
cert = /etc/xensource/xapi-ssl.pem
key =                                   ; empty: the key is in the cert file
client_ca =                             ; set: client certificates are required and verified
"""

import configparser

DEFAULTS = {
    "sr_roots": ["/var/run/sr-mount"],
    "admin_socket": "/run/fastpath/agent.sock",
    "nbd_listen": ("0.0.0.0", 10810),
    "http_listen": ("0.0.0.0", 8843),
    "tls_mode": "require",
    "tls_cert": "/etc/xensource/xapi-ssl.pem",
    "tls_key": None,
    "tls_client_ca": None,
    "max_connections": 256,
    "max_inflight": 32,
    "workers": 4,
    "handshake_timeout": 5.0,
    "idle_timeout": 300.0,
    "list_exports": False,
    "sm_lock_dir": "/var/lock/sm",
    "sm_ipc_dir": "/var/run/sm/ipc",
    "gc_abort_timeout": 60.0,
    "sr_lock_timeout": 10.0,
    "lvm": "auto",
    "lvm_lvs": "lvs",
    "lvm_lvchange": "lvchange",
    "lvm_dev_dir": "/dev",
    "http_max_connections": 64,
    "http_header_timeout": 10.0,
    "http_idle_timeout": 60.0,
    "http_send_timeout": 60.0,
    "max_block_status_descriptors": 8192,
    "max_handshakes": 64,
    "max_handshakes_per_address": 16,
    "http_max_unauthenticated": 32,
    "http_max_unauthenticated_per_address": 16,
    "http_unauthenticated_timeout": 5.0,
}


class ConfigError(ValueError):
    pass


def parse_listen(value, what="listen"):
    """'HOST:PORT', '[V6]:PORT' or ':PORT' -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ConfigError("%s %r: expected [HOST]:PORT" % (what, value))
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ConfigError("%s %r: expected HOST:PORT" % (what, value))
    try:
        port = int(port)
    except ValueError:
        raise ConfigError("%s %r: port is not a number" % (what, value)) from None
    if not 0 <= port <= 65535:
        raise ConfigError("%s %r: port out of range" % (what, value))
    return (host or "0.0.0.0", port)


class Config(object):
    def __init__(self, **values):
        for k, v in DEFAULTS.items():
            setattr(self, k, values.pop(k, v))
        if values:
            raise ConfigError("unknown settings: %s" % ", ".join(sorted(values)))
        self.validate()

    def validate(self):
        if self.tls_mode not in ("off", "optional", "require"):
            raise ConfigError("tls mode must be off, optional or require, got %r" % self.tls_mode)
        if not self.sr_roots:
            raise ConfigError("at least one SR root is needed")
        if self.lvm not in (True, False, "auto"):
            raise ConfigError("[lvm] enabled must be yes, no or auto, got %r" % (self.lvm,))
        for key in ("gc_abort_timeout", "sr_lock_timeout"):
            if getattr(self, key) < 0:
                raise ConfigError("%s must not be negative" % key)
        for key in (
            "http_header_timeout",
            "http_idle_timeout",
            "http_send_timeout",
            "http_unauthenticated_timeout",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError("[http] %s must be positive" % key[len("http_") :])
        for key in (
            "max_connections",
            "http_max_connections",
            "max_block_status_descriptors",
            "max_handshakes",
            "max_handshakes_per_address",
            "http_max_unauthenticated",
            "http_max_unauthenticated_per_address",
        ):
            if getattr(self, key) < 1:
                raise ConfigError("%s must be at least 1" % key)

    def lvm_enabled(self):
        """True when LVM SRs are served: enabled = yes, or auto and `lvs` is on PATH."""
        if self.lvm == "auto":
            import shutil

            return shutil.which(self.lvm_lvs) is not None
        return bool(self.lvm)

    def to_dict(self):
        return {k: getattr(self, k) for k in DEFAULTS}


def _split_list(value):
    return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]


def load(path=None, **overrides):
    """Defaults <- INI file (when given) <- overrides that are not None."""
    values = dict(DEFAULTS)
    if path is not None:
        cp = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
        try:
            with open(path) as f:
                cp.read_file(f)
        except OSError as exc:
            raise ConfigError("cannot read config %s: %s" % (path, exc)) from exc
        except configparser.Error as exc:
            raise ConfigError("bad config %s: %s" % (path, exc)) from exc
        try:
            if cp.has_option("agent", "sr_roots"):
                values["sr_roots"] = _split_list(cp.get("agent", "sr_roots"))
            if cp.has_option("agent", "admin_socket"):
                values["admin_socket"] = cp.get("agent", "admin_socket").strip()
            for key in ("sm_lock_dir", "sm_ipc_dir"):
                if cp.has_option("agent", key):
                    values[key] = cp.get("agent", key).strip() or None
            for key in ("gc_abort_timeout", "sr_lock_timeout"):
                if cp.has_option("agent", key):
                    values[key] = float(cp.get("agent", key))
            if cp.has_option("lvm", "enabled"):
                v = cp.get("lvm", "enabled").strip().lower()
                values["lvm"] = "auto" if v == "auto" else cp.getboolean("lvm", "enabled")
            for key in ("lvs", "lvchange", "dev_dir"):
                if cp.has_option("lvm", key):
                    values["lvm_" + key] = cp.get("lvm", key).strip()
            if cp.has_option("nbd", "listen"):
                values["nbd_listen"] = parse_listen(cp.get("nbd", "listen"), "[nbd] listen")
            if cp.has_option("http", "listen"):
                values["http_listen"] = parse_listen(cp.get("http", "listen"), "[http] listen")
            for key, conv in (
                ("max_connections", int),
                ("max_inflight", int),
                ("workers", int),
                ("handshake_timeout", float),
                ("idle_timeout", float),
                ("max_block_status_descriptors", int),
                ("max_handshakes", int),
                ("max_handshakes_per_address", int),
            ):
                if cp.has_option("nbd", key):
                    values[key] = conv(cp.get("nbd", key))
            for key, conv in (
                ("max_connections", int),
                ("header_timeout", float),
                ("idle_timeout", float),
                ("send_timeout", float),
                ("max_unauthenticated", int),
                ("max_unauthenticated_per_address", int),
                ("unauthenticated_timeout", float),
            ):
                if cp.has_option("http", key):
                    values["http_" + key] = conv(cp.get("http", key))
            if cp.has_option("nbd", "list_exports"):
                values["list_exports"] = cp.getboolean("nbd", "list_exports")
            if cp.has_option("tls", "mode"):
                values["tls_mode"] = cp.get("tls", "mode").strip()
            for key in ("cert", "key", "client_ca"):
                if cp.has_option("tls", key):
                    values["tls_" + key] = cp.get("tls", key).strip() or None
        except ValueError as exc:
            raise ConfigError("bad config %s: %s" % (path, exc)) from exc
    for k, v in overrides.items():
        if v is not None:
            values[k] = v
    return Config(**values)
