"""Command line: `unsloth-ext env` (the default; also `python -m unsloth_ext`),
`unsloth-ext finetune` (QLoRA fine-tuning; a demo with no arguments) and `unsloth-ext demo`
(the environment report, then each op against its reference)."""

from __future__ import annotations

import argparse
import sys


def _env(_args) -> int:
    from unsloth_ext.env_report import report

    text, code = report()
    print(text)
    return code


def _demo(_args) -> int:
    from unsloth_ext.demo import run_op_demo

    code = _env(_args)
    print()
    run_op_demo()
    return code


def _finetune(args) -> int:
    from unsloth_ext.finetune import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    from unsloth_ext.finetune import add_arguments

    parser = argparse.ArgumentParser(prog="unsloth-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("env", help="print the environment report (the default)").set_defaults(func=_env)
    sub.add_parser("demo", help="environment report, then each op against its reference"
                   ).set_defaults(func=_demo)
    finetune = sub.add_parser("finetune", help="QLoRA fine-tuning (a demo with no arguments)")
    add_arguments(finetune)
    finetune.set_defaults(func=_finetune)
    args = parser.parse_args(argv)
    return getattr(args, "func", _env)(args)


if __name__ == "__main__":
    sys.exit(main())
