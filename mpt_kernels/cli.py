"""The ``mpt-kernels`` command (also ``python -m mpt_kernels``).

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
SUBCOMMANDS = {
    "info": ("mpt_kernels.info", "versions, device, and which backends can run here"),
    "demo": ("mpt_kernels.demo", "the negative-flip experiment on scikit-learn's digits"),
    "bench": ("mpt_kernels.bench", "kernel benchmarks (GPU; tiny CPU smoke run with --quick)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpt-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
