"""The `paperloop` command.

    paperloop list                              the reproduced papers
    paperloop run PAPER [key=value ...]         run one with its config.yaml and overrides
    paperloop run PAPER --help                  its config keys, their defaults and what they mean
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, describe_keys, load_config
from .lock import OutputLockError


def main(argv: list[str] | None = None) -> int:
    from . import papers

    parser = argparse.ArgumentParser(prog="paperloop", description="Reproduce ML papers with paperloop.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the reproduced papers", description="List the reproduced papers.")
    # Help is ours: `run PAPER --help` lists that paper's keys, which argparse cannot know.
    run = sub.add_parser("run", help="run a paper's reproduction", add_help=False,
                         description="Run PAPER with papers/PAPER/config.yaml, then key=value overrides. "
                                     "`paperloop run PAPER --help` lists PAPER's config keys.")
    run.add_argument("-h", "--help", action="store_true", help="show this help (with PAPER: its config keys) and exit")
    run.add_argument("paper", nargs="?", help="a name from `paperloop list`")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=500")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in papers.available():
            print(f"{name:12s} {(papers.load(name).__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.paper is None:
        if args.help:
            run.print_help()
            return 0
        run.error("the following arguments are required: paper")
    try:
        module = papers.load(args.paper)
        if args.help:
            print(paper_help(args.paper, module, papers.config_path(args.paper)))
            return 0
        config = load_config(module.Config, papers.config_path(args.paper), args.overrides)
    except (KeyError, ConfigError) as e:
        return error(e, 2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = module.run(config)
    except ConfigError as e:  # found once the output folder is read (other settings there)
        return error(e, 2)
    except OutputLockError as e:
        return error(e, 1)
    except KeyboardInterrupt as e:
        print(f"paperloop: interrupted: {e.args[0] if e.args else 'no checkpoint was written'}", file=sys.stderr)
        return 130
    print(f"paperloop: {args.paper} wrote its results to {out}")
    return 0


def error(e: Exception, code: int) -> int:
    print(f"paperloop: error: {e.args[0]}", file=sys.stderr)
    return code


def paper_help(name: str, module, config_path) -> str:
    """Usage, the paper's docstring, and every config key with its default and comment."""
    lines = [f"usage: paperloop run {name} [key=value ...]", "", (module.__doc__ or "").strip(), "",
             f"config keys (defaults from {config_path}; override any with key=value):"]
    for key, kind, value, comment in describe_keys(module.Config, config_path):
        lines.append(f"  {key}={yaml_value(value)}".ljust(36) + (f" {comment} ({kind})" if comment else f" ({kind})"))
    return "\n".join(lines)


def yaml_value(value) -> str:
    """A value as it is written in config.yaml or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
