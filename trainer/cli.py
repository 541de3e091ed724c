"""The `paperloop` command.

    paperloop --help, paperloop --version       answer at once (nothing here imports torch until a command runs)
    paperloop list                              the reproduced papers
    paperloop run PAPER [key=value ...]         run one with its config.yaml and overrides
    paperloop run PAPER --help                  its config keys, their defaults and what they mean
    paperloop merge CHECKPOINT OUT [--base B]   merge a LoRA checkpoint into a plain transformers folder

`main` parses the command line and hands it to one function per subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import ConfigError, describe_keys, load_config
from .lock import OutputLockError


def main(argv: list[str] | None = None) -> int:
    # `--help` and `--version` answer before anything imports torch (seconds): this module and the config's import
    # none of it, and a subcommand imports what it needs when it runs.
    parser = argparse.ArgumentParser(prog="paperloop", description="Reproduce ML papers with paperloop.")
    parser.add_argument("--version", action="version", version=f"paperloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the reproduced papers", description="List the reproduced papers.")
    # Help is ours: `run PAPER --help` lists that paper's keys, which argparse cannot know.
    run = sub.add_parser("run", help="run a paper's reproduction", add_help=False,
                         description="Run PAPER with papers/PAPER/config.yaml, then key=value overrides. "
                                     "`paperloop run PAPER --help` lists PAPER's config keys.")
    run.add_argument("-h", "--help", action="store_true", help="show this help (with PAPER: its config keys) and exit")
    run.add_argument("paper", nargs="?", help="a name from `paperloop list`")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=500")
    merge = sub.add_parser("merge", help="merge a LoRA checkpoint into a plain transformers model folder",
                           description="Merge CHECKPOINT's LoRA adapter into its base model; write the model "
                                       "(and the checkpoint's tokenizer) to OUT.")
    merge.add_argument("checkpoint")
    merge.add_argument("out")
    merge.add_argument("--base", help="the base model folder (default: the one adapter_config.json names)")
    merge.add_argument("--force", action="store_true", help="replace OUT when it is a folder with files in it")
    args = parser.parse_args(argv)
    if args.command == "run" and args.paper is None and not args.help:
        run.error("the following arguments are required: paper")
    commands = {"list": list_papers, "run": lambda a: run_paper(a, run), "merge": merge_adapter}
    return commands[args.command](args)


def list_papers(args) -> int:
    from . import papers

    for name in papers.available():
        print(f"{name:12s} {(papers.load(name).__doc__ or '').strip().splitlines()[0]}")
    return 0


def run_paper(args, parser: argparse.ArgumentParser) -> int:
    if args.paper is None:  # `paperloop run --help`
        parser.print_help()
        return 0
    from . import papers
    try:
        module = papers.load(args.paper)
        if args.help:
            print(paper_help(args.paper, module, papers.config_path(args.paper)))
            return 0
        config = load_config(module.Config, papers.config_path(args.paper), args.overrides)
    except (KeyError, ConfigError) as e:
        return error(e, 2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .checkpoint import CheckpointError

    try:
        out = module.run(config)
    except (ConfigError, CheckpointError) as e:  # found once the output folder is read (other settings there)
        return error(e, 2)
    except OutputLockError as e:
        return error(e, 1)
    except KeyboardInterrupt as e:
        print(f"paperloop: interrupted: {e.args[0] if e.args else 'no checkpoint was written'}", file=sys.stderr)
        return 130
    print(f"paperloop: {args.paper} wrote its results to {out}")
    return 0


def merge_adapter(args) -> int:
    from .checkpoint import CheckpointError
    from .lm.lora import merge_checkpoint  # the one subcommand of the language-model room

    try:
        out = merge_checkpoint(args.checkpoint, args.out, args.base, force=args.force,
                               report=lambda message: print(f"paperloop: {message}", file=sys.stderr))
        print(f"paperloop: merged model written to {out} (read back and checked)")
    except (CheckpointError, ImportError) as e:
        return error(e, 2)
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
