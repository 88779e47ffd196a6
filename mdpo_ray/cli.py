"""argv -> config -> launch. No logic: a bad config exits 2 here, before Ray is asked for anything."""

from __future__ import annotations

import argparse
import sys

from mdpo_ray.config import ConfigError, load_config, to_yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo-ray", description="MinorDPO preference training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train one run (no config: the built-in arithmetic task)"),
                       ("config", "print the resolved config as YAML and exit")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", nargs="?", help="run YAML (see sweeps/ and README.md); default: built-in")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a dotted key, e.g. --set loss.beta=0.3 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mdpo-ray: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    from mdpo_ray import launch  # imports Ray; only after the config is known to be good

    summary = launch.train(cfg)
    print(launch.describe(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
