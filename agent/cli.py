"""The `fastpath-agent` command: inspect VHD and QCOW2 chains and write them out locally.

  fastpath-agent info PATH [--json]
  fastpath-agent map PATH [--base PATH] [--json]
  fastpath-agent export PATH --format raw|vhd [--base PATH] -o OUT|-

PATH is a chain's leaf, VHD or QCOW2 (told apart by content, agent.image); --base the same format.
Exit codes: 0 success, 1 operational failure (bad image, I/O error), 2 usage error. Errors are one
line on stderr. The daemon's commands (`serve`, `ticket`) are added by agent.daemon when it is present.
"""

import argparse
import json
import os
import sys

from agent import image, vhd


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        sys.exit(2)


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)  # pragma: no cover


def cmd_info(args):
    with image.open_chain(args.path) as chain:
        desc = chain.describe()
        desc.setdefault("format", image.chain_format(chain))
        if args.json:
            print(json.dumps(desc, indent=2, sort_keys=True))
            return 0
        print(
            "%s chain %s: %s (%d bytes), block size %s, %d blocks, depth %d"
            % (
                image.chain_format(chain).upper(),
                chain.path,
                _human(chain.size),
                chain.size,
                _human(chain.block_size),
                chain.block_count,
                chain.depth,
            )
        )
        for i, f in enumerate(desc["files"]):
            line = "  [%d] %s  %s" % (i, f["path"], f["type"])
            if "uuid" in f:
                line += "  uuid %s" % f["uuid"]
            line += "  size %d" % f["size"]
            if "cluster_size" in f:
                line += "  cluster %s" % _human(f["cluster_size"])
            if "allocated_blocks" in f:
                line += "  allocated %d/%d blocks" % (f["allocated_blocks"], f["blocks"])
            if f.get("hidden"):
                line += "  hidden"
            print(line)
    return 0


def cmd_map(args):
    with image.open_chain(args.path) as chain:
        if args.base:
            with image.open_chain(args.base) as base:
                blocks = chain.changed_blocks(base)
            if args.json:
                print(
                    json.dumps(
                        {
                            "block_size": chain.block_size,
                            "size": chain.size,
                            "changed_blocks": blocks,
                        }
                    )
                )
            else:
                print(
                    "%d changed blocks of %s (block size %d)"
                    % (len(blocks), chain.block_count, chain.block_size)
                )
                for b in blocks:
                    print("%d\t%d" % (b, b * chain.block_size))
            return 0
        extents = chain.extents()
        if args.json:
            print(
                json.dumps(
                    [{"offset": e.offset, "length": e.length, "zero": e.zero} for e in extents]
                )
            )
        else:
            for e in extents:
                print("%d\t%d\t%s" % (e.offset, e.length, "zero" if e.zero else "data"))
    return 0


def cmd_export(args):
    if args.format == "raw" and args.base:
        raise _UsageError("--base only applies to --format vhd")
    with image.open_chain(args.path) as chain:
        out = args.output
        if out == "-" and sys.stdout.isatty():
            raise _UsageError("refusing to write a disk image to a terminal")
        target = sys.stdout.buffer if out == "-" else out
        if args.format == "raw":
            vhd.export_raw(chain, target)
        elif args.base:
            with image.open_chain(args.base) as base:
                vhd.export_vhd(chain, target, base=base)
        else:
            vhd.export_vhd(chain, target)
    return 0


def build_parser():
    parser = _Parser(
        prog="fastpath-agent",
        description="xcp-fastpath agent: VHD and QCOW2 chains, NBD/HTTP export",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="describe a VHD or QCOW2 chain")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("map", help="data/zero extents, or the blocks changed since --base")
    p.add_argument("path")
    p.add_argument("--base", help="an ancestor chain: list the blocks changed since it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("export", help="write the chain as a raw image or a VHD")
    p.add_argument("path")
    p.add_argument("--format", choices=("raw", "vhd"), required=True)
    p.add_argument(
        "--base",
        help="(vhd) write only the blocks changed since this ancestor, as a differencing VHD",
    )
    p.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    p.set_defaults(func=cmd_export)

    try:
        from agent import daemon
    except ImportError:
        daemon = None
    if daemon is not None and hasattr(daemon, "register"):
        daemon.register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except _UsageError as exc:
        sys.stderr.write("fastpath-agent: error: %s\n" % exc)
        return 2
    except image.image_errors() as exc:
        sys.stderr.write("fastpath-agent: %s\n" % exc)
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write("fastpath-agent: %s\n" % exc)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("fastpath-agent: interrupted\n")
        return 1
    except Exception as exc:  # a bug: still one line, the traceback with FASTPATH_DEBUG=1
        if os.environ.get("FASTPATH_DEBUG") == "1":
            raise
        sys.stderr.write("fastpath-agent: internal error: %s: %s\n" % (type(exc).__name__, exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
