"""Evaluation CLI: ``python -m lct_jax.eval COMMAND ...``; ``python -m lct_jax.eval COMMAND --help`` for its flags.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in :data:`COMMANDS`;
user mistakes end in one ``error: ...`` line and exit status 2, as in every lct_jax command
(:func:`lct_jax.cli.report_errors`; ``--debug`` or ``LCT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lct_jax.cli import report_errors

# command -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "make-video": (
        "lct_jax.eval.make_video",
        "the procedural haystack movie -> a video file (seeded, any length)",
    ),
    "make-needles": (
        "lct_jax.eval.needles",
        "needle images + needles.json (question, one-word answer), seeded",
    ),
    "haystack": ("lct_jax.eval.haystack", "video frames -> V-NIAH visual-token store [N, P, D], resumable"),
    "vniah": (
        "lct_jax.eval.vniah",
        "V-NIAH grid (frames x depth) on a haystack store: results, heatmap, events",
    ),
    "text-niah": ("lct_jax.eval.text_niah", "text NIAH grid (tokens x depth): results, heatmap, events"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse prints the usage too)
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:  # no command, --help, or an unknown one: argparse says so
        parser = _Parser(
            prog="python -m lct_jax.eval",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, (_, help_) in COMMANDS.items():
            sub.add_parser(name, help=help_)
        parser.parse_args(argv)
        return 2
    cmd = argv[0]
    module = importlib.import_module(COMMANDS[cmd][0])  # only this command's imports (jax for some)
    parser = _Parser(
        prog=f"python -m lct_jax.eval {cmd}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of every failure (LCT_DEBUG=1)"
    )
    args = parser.parse_args(argv[1:])
    try:
        return report_errors(lambda: module.run(args), argv)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same `{cmd}` command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
