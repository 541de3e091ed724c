"""The `paperloop` command.

    paperloop list                              the reproduced papers
    paperloop run PAPER [key=value ...]         run one with its config.yaml and overrides
    paperloop merge CHECKPOINT OUT [--base B]   merge a LoRA checkpoint into a plain transformers folder
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    from . import papers

    parser = argparse.ArgumentParser(prog="paperloop", description="Reproduce ML papers with paperloop.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the reproduced papers", description="List the reproduced papers.")
    run = sub.add_parser("run", help="run a paper's reproduction",
                         description="Run PAPER with papers/PAPER/config.yaml, then key=value overrides.")
    run.add_argument("paper", help="a name from `paperloop list`")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=500")
    merge = sub.add_parser("merge", help="merge a LoRA checkpoint into a plain transformers model folder",
                           description="Merge CHECKPOINT's LoRA adapter into its base model; write the model "
                                       "(and the checkpoint's tokenizer) to OUT.")
    merge.add_argument("checkpoint")
    merge.add_argument("out")
    merge.add_argument("--base", help="the base model folder (default: the one adapter_config.json names)")
    args = parser.parse_args(argv)

    if args.command == "merge":
        from .checkpoint import CheckpointError
        from .lora import merge_checkpoint

        try:
            print(f"paperloop: merged model written to {merge_checkpoint(args.checkpoint, args.out, args.base)}")
        except (CheckpointError, ImportError) as e:
            print(f"paperloop: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "list":
        for name in papers.available():
            print(f"{name:12s} {(papers.load(name).__doc__ or '').strip().splitlines()[0]}")
        return 0
    try:
        module = papers.load(args.paper)
        config = load_config(module.Config, papers.config_path(args.paper), args.overrides)
    except (KeyError, ConfigError) as e:
        print(f"paperloop: error: {e.args[0]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = module.run(config)
    except KeyboardInterrupt as e:
        print(f"paperloop: interrupted: {e.args[0] if e.args else 'no checkpoint was written'}", file=sys.stderr)
        return 130
    print(f"paperloop: {args.paper} wrote its results to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
