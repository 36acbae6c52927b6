"""The `misguard` command line: each command parses its options, calls one pipeline function and prints.

The commands live in the modules beside this one and each imports what it runs at the top. This module lists
them without importing them (click's lazy-loading pattern, `COMMANDS`), so `misguard --help` starts in a fraction
of a second and never loads torch; a command's module is imported when it runs or shows its own help.
MisguardError (bad input, a missing model) becomes a one-line message and exit code 1, here only, and so does an
optional package that is not installed, wherever its import fails (core.errors.missing_extra): the line names the
command, the package and the pip command. A bad option value (out of its range, not a number) is refused while the
options are parsed, before any work, with one line naming the option and exit code 2. Ctrl-C is exit code 130 and
one line: what the run had saved (core.interrupts) and the command that resumes it.
"""
from __future__ import annotations

import importlib
import logging
import shlex
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from misguard.core.errors import MisguardError, MissingExtraError, missing_extra
from misguard.core.interrupts import saved_when_interrupted

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module that defines it, one line for `misguard --help`)
    "infer": ("misguard.cli.infer", "Run a target VLM over an MIS split and write its responses (resumable)."),
    "merge": ("misguard.cli.infer", "Join the shards of a `misguard infer --shard I/N` run."),
    "score": ("misguard.cli.score", "Judge responses (or read GPT-4o's labels) and write the MIS metrics."),
    "calibrate": ("misguard.cli.evaluate", "Fit a calibration of the judge's probabilities against reference labels."),
    "agree": ("misguard.cli.evaluate", "Agreement of the judge with reference (GPT-4o) and human labels."),
    "train": ("misguard.cli.train", "Train a judge on GPT-4o's labels: a fine-tuned VLM or a CPU lite judge."),
    "serve": ("misguard.cli.serve", "Guard a deployed VLM: an OpenAI-compatible server with input and output rails."),
    "demo": ("misguard.cli.tools", "Run misguard end to end on generated data and tiny models (no GPU, no network)."),
    "make-demo-data": ("misguard.cli.tools", "Write a small synthetic MIS-shaped test directory."),
    "make-judge": ("misguard.cli.tools", "Make a model folder a judge folder (judge.json)."),
    "make-tiny-model": ("misguard.cli.tools", "Build a tiny random-weight model of a real VLM architecture."),
}


class LazyGroup(TyperGroup):
    """The command group: lists COMMANDS, imports a command's module only when the command is asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[cmd_name][0])
        return typer.main.get_group(module.commands).commands[cmd_name]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        # Plain click help, not typer's rich one: that one asks every command for its own help.
        super(TyperGroup, self).format_help(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        # The listing comes from COMMANDS, so help imports no command module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


app = typer.Typer(name="misguard", cls=LazyGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


@app.callback()
def misguard() -> None:
    """Offline judge and guardrail for vision-language models on the MIS multi-image safety benchmark."""


def main() -> None:
    """Console-script entry point: run the app. Exits 0 when the command succeeds; a MisguardError or a missing
    optional package becomes one line on stderr and exit code 1; a usage error (a bad or missing option) one line
    naming the option and exit code 2; Ctrl-C one line (what was saved, the command that resumes) and exit code
    130."""
    logging.basicConfig(level=logging.WARNING, format="misguard: %(levelname)s: %(message)s")
    try:
        # Not standalone: click would print a usage error as a framed block; here it is one line, as ours are.
        code = app(standalone_mode=False)
    except (MissingExtraError, ImportError) as exc:  # a command module's import, or one made while it runs
        missing = missing_extra(exc)
        if missing is None:
            raise  # not an optional package: a bug, shown with its traceback
        extra = f"the [{missing.extra}] extra" if missing.extra else "a dependency of misguard"
        _error(f"{_command()} needs {missing.package} ({extra}): {missing.install_command}")
        sys.exit(1)
    except MisguardError as exc:
        _error(str(exc))
        sys.exit(1)
    except typer.TyperException as exc:  # click's usage errors: a bad option value, a missing option
        if type(exc).__name__ == "NoArgsIsHelpError":  # no command given: its message is the help (typer's test)
            typer.echo(exc.format_message(), err=True)
        else:
            ctx = getattr(exc, "ctx", None)
            _error(exc.format_message().rstrip(".") + (f"; see '{ctx.command_path} --help'" if ctx else ""))
        sys.exit(exc.exit_code)
    except typer.Abort:
        _error("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns Ctrl-C inside a command into exit code 130
        # The command as given, but never --no-resume: run again with it, a training run would start over.
        again = shlex.join(["misguard", *(arg for arg in sys.argv[1:] if arg != "--no-resume")])
        saved = saved_when_interrupted()
        typer.echo(f"misguard: interrupted: {saved}; resume with: {again}" if saved else
                   f"misguard: interrupted; re-run with: {again}", err=True)
    sys.exit(code if isinstance(code, int) else 0)


def _command() -> str:
    """The command being run, as the user typed it (`misguard train`): the first argument that is not an option
    (the group itself takes only --help)."""
    return " ".join(["misguard", *[arg for arg in sys.argv[1:] if not arg.startswith("-")][:1]])


def _error(message: str) -> None:
    typer.secho(f"misguard: error: {message}", err=True, fg=typer.colors.RED)


if __name__ == "__main__":
    main()
