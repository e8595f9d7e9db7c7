"""The command group under ``yolodistill``: where the tool's --verbose may stand, and typer's parse errors as one
line with exit code 2."""

from __future__ import annotations

import re
import traceback
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

STATE = {"verbose": False}
USAGE_ERROR = typer.BadParameter.__mro__[1]  # click's UsageError (typer may vendor click)


class Commands(TyperGroup):
    """A command line typer cannot parse (a missing option, 'abc' for a number) is bad input like any other: one
    'error:' line and exit code 2."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # --verbose is the tool's option, given before the command; the error lines say "run with --verbose", and
        # users add it (or -v) after the command: there it is taken as well (no command has an option of that name)
        # read here as well as in the callback: the tool's own options' errors come before it runs (and an earlier
        # call in this process may have set it)
        STATE["verbose"] = any(is_verbose_flag(arg) for arg in args[: command_at(args)])
        moved = self.verbose_flags_after_command(ctx, args)
        if moved:
            args = ["--verbose", *(arg for i, arg in enumerate(args) if i not in moved)]  # a second --verbose: no harm
        try:
            return super().parse_args(ctx, args)
        except USAGE_ERROR as e:  # the tool's own options: 'yolodistill --bogus'
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare 'yolodistill': click prints the help, exit 2
                raise
            usage_error(e)

    def verbose_flags_after_command(self, ctx: Any, args: list[str]) -> set[int]:
        """Where --verbose or -v stands as a flag after the command: not the value of an option that takes one
        ('--name -v' names the run '-v'), and not after '--'."""
        at = command_at(args)
        command = self.get_command(ctx, args[at]) if at < len(args) else None
        if command is None:
            return set()
        takes_value = {name for p in command.params if not getattr(p, "is_flag", True) for name in p.opts}
        found, i = set(), at + 1
        while i < len(args) and args[i] != "--":
            if is_verbose_flag(args[i]):
                found.add(i)
            i += 2 if args[i] in takes_value else 1
        return found

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USAGE_ERROR as e:
            usage_error(e)


def command_at(args: list[str]) -> int:
    """Where the command stands: after the tool's own flags (it has no option that takes a value)."""
    return next((i for i, arg in enumerate(args) if not arg.startswith("-")), len(args))


def is_verbose_flag(arg: str) -> bool:
    return arg == "--verbose" or re.fullmatch(r"-v+", arg) is not None  # -vv as click reads it before the command


def usage_error(e: Exception) -> NoReturn:
    """Click's usage error as one 'error:' line, exit 2 (the traceback above it with --verbose)."""
    from .console import err_console

    if STATE["verbose"]:  # as for any other error
        traceback.print_exc()
    message = e.format_message()
    where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
    takes_set = e.ctx is not None and any("--set" in getattr(p, "opts", ()) for p in e.ctx.command.params)
    if takes_set and "unexpected extra argument" in message and "=" in message:  # --set a=1 b=2
        where = f"; each key=value takes its own --set (--set a=1 --set b=2){where}"
    err_console.print(f"[red]error:[/] {message}{where}", highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code) from None
