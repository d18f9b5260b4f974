"""`meshd`: run a node, make keys, check a config file. Argument parsing only.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from meshd import PROTOCOL_VERSION, __version__
from meshd.errors import ConfigError, MeshError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _run_flags(p: argparse.ArgumentParser) -> None:
    # Every default is None: "not given", so the environment and the file can fill it in.
    a = p.add_argument
    a(
        "--config",
        metavar="FILE",
        help="TOML configuration file, then its drop-ins <stem>.d/*.toml in name order (env MESHD_CONFIG)",
    )
    a("--name", help="node name, unique in the mesh (default: host name)")
    a("--cluster", help="mesh name; nodes of another mesh are ignored (default: default)")
    a("--bind", metavar="HOST:PORT", help="gossip UDP and peer TCP port (default: 0.0.0.0:7788)")
    a("--advertise", metavar="HOST:PORT", help="address other nodes use (default: derived)")
    a("--api", metavar="HOST:PORT", help="operator HTTP API (default: 127.0.0.1:7789)")
    a(
        "--registry",
        metavar="HOST:PORT",
        help="OCI registry read endpoint for containerd mirrors, e.g. 127.0.0.1:5000 (default: off)",
    )
    a(
        "--registry-upstream",
        metavar="URL",
        action="append",
        default=[],
        help="upstream registry the registry pulls through (site cache), e.g. https://registry-1.docker.io; "
        "repeatable: containerd's ?ns= picks one, else the first (default: none, no pull-through)",
    )
    a("--registry-cache-max", metavar="SIZE", help="size cap of the pull-through cache (default: 10GiB)")
    a(
        "--registry-pass-tags",
        action="store_true",
        default=None,
        help="pass unsigned tags through from upstream (default: only signed image releases resolve tags)",
    )
    a(
        "--data-dir",
        metavar="DIR",
        help="node key, keyring, peer snapshot, API token (default: /var/lib/meshd)",
    )
    a(
        "--join",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="seed to join; repeatable; retried until it works",
    )
    a("--site", help="site of this gateway (default: default)")
    a("--tag", metavar="KEY=VALUE", action="append", default=[], help="free tag; repeatable")
    a("--no-mdns", action="store_true", default=None, help="disable mDNS discovery")
    a(
        "--mdns-interface",
        metavar="IP",
        action="append",
        default=[],
        help="limit mDNS to this interface address; repeatable",
    )
    a("--cluster-key-file", metavar="FILE", help="32-byte cluster key (base64); required unless --insecure")
    a("--insecure", action="store_true", default=None, help="no encryption; refused unless bound to loopback")
    a("--profile", choices=("lan", "wan", "local"), help="protocol timings (default: lan)")
    a(
        "--trust-publisher",
        metavar="FILE",
        action="append",
        default=[],
        help="public key whose signed releases this node installs; repeatable",
    )
    a(
        "--protocol",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one protocol setting, e.g. probe_interval=500ms; repeatable",
    )
    a("--log-level", choices=("debug", "info", "warning", "error"), help="default: info")
    a(
        "--log-format",
        choices=("text", "json"),
        help="text lines, or one JSON object per line (time, level, logger, message, fields); default: text",
    )
    a(
        "--api-allow-host",
        metavar="NAME[:PORT]",
        action="append",
        default=[],
        help="a name the operator API answers to besides loopback names and its own address "
        "(a proxy, the gateway's DNS name); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshd", description="meshd: peer-to-peer coordinator for edge sites")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    run = sub.add_parser("run", help="run a node in the foreground")
    _run_flags(run)
    keygen = sub.add_parser("keygen", help="create a cluster key or a publisher key pair")
    keygen.add_argument("kind", choices=("cluster", "publisher"))
    keygen.add_argument(
        "--out", metavar="FILE", required=True, help="where to write the key (publisher: FILE and FILE.pub)"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    validate = sub.add_parser("validate-config", help="check a configuration file and exit")
    _run_flags(validate)
    sub.add_parser("version", help="print the version")
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("command",)}


def cmd_run(args: argparse.Namespace) -> int:
    from meshd.config import load_config
    from meshd.daemon import run_daemon

    flags = _flags(args)
    cfg = load_config(flags)
    return run_daemon(cfg, reload=lambda: load_config(flags))


def cmd_validate(args: argparse.Namespace) -> int:
    from meshd.config import load_config

    flags = _flags(args)
    if not flags.get("config") and not os.environ.get("MESHD_CONFIG"):
        raise ConfigError("validate-config needs --config FILE")
    cfg = load_config(flags)
    if not cfg.insecure and not cfg.cluster_key_file:
        print(
            f"{cfg.source}: note: no cluster_key_file; the node needs one unless its data dir "
            "already holds a keyring",
            file=sys.stderr,
        )
    if cfg.cluster_key_file:
        from meshd.crypto import read_key_file

        read_key_file(cfg.cluster_key_file)
    from meshd.health.service import parse_health_config

    parse_health_config(cfg.checks, cfg.query_handlers, cfg.data_dir)  # names a bad check
    for drop_in in cfg.sources[1:]:
        print(f"{drop_in}: read after {cfg.source}")
    print(
        f"{cfg.source}: ok (node {cfg.name}, cluster {cfg.cluster}, bind {cfg.bind}, profile {cfg.profile})"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from meshd import crypto

    out: str = args.out
    targets = [out] if args.kind == "cluster" else [out, out + ".pub"]
    for t in targets:
        if os.path.exists(t) and not args.force:
            raise ConfigError(f"--out {t}: file exists (use --force to overwrite)")
    try:
        if args.kind == "cluster":
            key = crypto.generate_cluster_key()
            crypto.write_key_file(out, key)
            print(f"wrote cluster key {crypto.fingerprint(key)} to {out}")
        else:
            crypto.generate_publisher_keypair(out)
            print(f"wrote publisher key to {out} and its public key to {out}.pub")
    except OSError as e:
        raise ConfigError(f"--out {out}: {e.strerror or e}") from None
    return 0


def _version_line() -> str:
    return f"meshd {__version__} (protocol {PROTOCOL_VERSION})"


def cmd_version(args: argparse.Namespace) -> int:
    print(_version_line())
    return 0


COMMANDS = {
    "run": cmd_run,
    "keygen": cmd_keygen,
    "validate-config": cmd_validate,
    "version": cmd_version,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"meshd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MeshError as e:
        print(f"meshd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
