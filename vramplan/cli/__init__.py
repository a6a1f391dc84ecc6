"""Command line: argparse subcommands, lazy imports, ``main(argv) -> int``.

Exit codes: 0 ok; 1 a check failed (``check``: a case off tolerance; ``estimate --max-gib``: does not
fit); 2 bad input (unknown model, malformed config, impossible setup), always one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vramplan.cli import common

#: Which module defines each command: a command's parser is built (and its module imported)
#: alone, so ``vramplan estimate`` loads nothing of the planner or the harness.
COMMANDS = {"estimate": "estimate_cmd", "profiles": "estimate_cmd", "gpus": "estimate_cmd",
            "fit": "plan_cmd", "table": "plan_cmd", "plot": "plan_cmd", "suggest": "plan_cmd",
            "docs": "plan_cmd", "measure": "measure_cmd", "check": "measure_cmd",
            "calibrate": "measure_cmd"}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``command`` alone when it is known (its help and errors are the same as in
    the full parser), else of every command (``--help``, ``--version``, a typo)."""
    parser = OneLineParser(
        prog="vramplan",
        description="Which GPU do I need to fine-tune this model? Analytic peak-memory estimates "
                    "for full fine-tuning, LoRA and QLoRA, checked against measured runs.",
        epilog="examples:\n  vramplan estimate llama-2-70b --method qlora\n"
               "  vramplan fit llama-3.1-8b --method lora --seq-len 4096\n  vramplan profiles\n"
               "  vramplan gpus",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from vramplan import __version__

    parser.add_argument("--version", action="version", version=f"vramplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    names = (COMMANDS[command],) if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in names:
        importlib.import_module(f"vramplan.cli.{name}").add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    parser = build_parser(args_in[0] if args_in else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 with one line already printed
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except common.UserError as exc:
        print(f"vramplan: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file that cannot be read or written: one line, not a traceback
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"vramplan: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vramplan: interrupted (records already written are kept)", file=sys.stderr)
        return 130
