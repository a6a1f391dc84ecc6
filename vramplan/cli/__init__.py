"""Command line: argparse subcommands, lazy imports, ``main(argv) -> int``.

Exit codes: 0 ok; 1 a check failed (``check``: a case off tolerance; ``estimate --max-gib``: does not
fit); 2 bad input (unknown model, malformed config, impossible setup), always one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from vramplan.cli import common, estimate_cmd, measure_cmd, plan_cmd


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
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
    for module in (estimate_cmd, plan_cmd, measure_cmd):
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
