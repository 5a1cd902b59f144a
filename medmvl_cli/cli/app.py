"""Root of the `medmvl` command line.

Commands are thin: they parse options, load and validate what they need and call one engine
function. Heavy libraries (torch, transformers, monai) are imported inside command bodies so that
`medmvl --help` stays fast. Known errors become one short panel on stderr and exit code 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from medmvl_cli import __version__
from medmvl_cli.errors import MedmvlError


class _ErrorHandlingGroup(TyperGroup):
    """Turns any failure of a command into one panel on stderr and exit code 1 (the traceback only
    with --debug). Typer's own exits and usage errors pass through. Without this, an EOFError (what
    torch raises for an empty file) would reach Typer, which takes it for Ctrl-D and prints only
    "Aborted."."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException, BrokenPipeError):
            raise  # exits, usage errors (exit 2) and a closed pipe are Typer's to handle
        except Exception as err:
            if _state["debug"]:
                raise
            print_error(err if isinstance(err, MedmvlError) else explain_unexpected(err))
            raise typer.Exit(1) from None


app = typer.Typer(
    name="medmvl",
    cls=_ErrorHandlingGroup,
    help="Build, train, evaluate and ship small medical vision-language models (2D and 3D).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"medmvl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads to compute with (default: the CPUs available less "
                     "the load already on them; also $MEDMVL_THREADS). `medmvl env` shows the choice."),
    ] = None,
) -> None:
    """medmvl: medical LVLMs from YAML recipes, on one CPU or many GPUs."""
    from medmvl_cli import threads as thread_policy

    _state["debug"] = debug
    thread_policy.apply(thread_policy.choose(threads))  # before any command imports torch
    if not debug:
        # Our own rich progress bars report long work; the libraries' tqdm bars only add noise.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "DS_ACCELERATOR" not in os.environ and not _nvidia_gpu_present():
        # Spares DeepSpeed's accelerator probe, which prints a warning on stdout (where results go).
        os.environ["DS_ACCELERATOR"] = "cpu"
    _configure_logging(logging.DEBUG if debug else logging.INFO)


def _nvidia_gpu_present() -> bool:
    """A cheap look for an NVIDIA driver, without importing torch."""
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _configure_logging(level: int) -> None:
    root_logger = logging.getLogger()
    handler = next((h for h in root_logger.handlers if isinstance(h, _CurrentStderrHandler)), None)
    if handler is None:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root_logger.addHandler(handler)
    root_logger.setLevel(level)


def _register() -> None:
    # Imported here so that each group module stays independent of the root.
    from medmvl_cli.cli import (
        chat_cmd,
        config_cmd,
        data_cmd,
        demo_cmd,
        env_cmd,
        eval_cmd,
        export_cmd,
        import_cmd,
        infer_cmd,
        quickstart_cmd,
        serve_cmd,
        train_cmd,
    )

    app.command("env", help="Versions, devices and optional parts present or absent.")(env_cmd.env)
    app.add_typer(config_cmd.app, name="config", help="Show or check a recipe.")
    app.add_typer(data_cmd.app, name="data", help="Validate, synthesise and cache datasets.")
    for stage in ("pretrain", "finetune", "lora"):
        app.command(stage)(getattr(train_cmd, stage))
    app.command("infer")(infer_cmd.infer)
    app.command("eval")(eval_cmd.eval_predictions)
    app.command("quickstart")(quickstart_cmd.quickstart)
    app.command("demo")(demo_cmd.demo)
    app.command("serve")(serve_cmd.serve)
    app.command("chat")(chat_cmd.chat)
    app.command("export")(export_cmd.export)
    app.add_typer(import_cmd.app, name="import", help="Turn checkpoints of other toolkits (MedM-VL) into medmvl runs.")


_register()


def explain_unexpected(err: Exception) -> MedmvlError:
    """What a library raised, said as a MedmvlError: an OSError names its file and the fix; anything
    else says what happened and how to see more."""
    from medmvl_cli.errors import RunError, os_error_hint

    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return RunError(f"{where}{err.strerror or err}", hint=os_error_hint(err))
    if isinstance(err, EOFError):
        return RunError(f"a file ended early while being read (EOFError{': ' + str(err) if str(err) else ''})",
                        hint="a file is empty or truncated: rerun with --debug to see which, then restore or remove it")
    detail = str(err).splitlines()[0] if str(err) else ""
    return RunError(f"{type(err).__name__}{': ' + detail if detail else ''}",
                    hint="rerun with --debug to see where it happened; if your inputs are fine, please report it")


def print_error(err: MedmvlError) -> None:
    from rich.console import Console
    from rich.panel import Panel

    body = err.message if not err.hint else f"{err.message}\n\n[bold]Fix:[/bold] {err.hint}"
    Console(stderr=True).print(Panel(body, title=err.title, title_align="left", border_style="red"))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry."""
    app(args=argv)


if __name__ == "__main__":
    main()
