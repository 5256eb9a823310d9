"""The `peftplan` command: a thin typer + rich shell over the pure core, one module per subcommand.

`app` (the console script `peftplan = peftplan.cli:app`) knows the subcommands by name only
(`COMMANDS`); a subcommand's module is imported, and its options built, when that subcommand runs or
`--help` lists it. So `peftplan estimate` imports neither the tracer's, the profiler's nor the
reports' command modules, and pays for none of their options. What the commands share (the one-line
error exit, help texts, the parsing of training flags) is in `common.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

# subcommand -> module of this package that defines it as a function of the same name; `--help` lists them
# in this order
COMMANDS: dict[str, str] = {
    "estimate": "estimate", "models": "models", "gpus": "gpus", "methods": "methods", "trainers": "trainers",
    "claims": "claims", "check": "check", "profile": "profile", "compare": "compare", "plan": "plan",
    "trace": "trace",
}


def _load(name: str) -> Any:
    """The click command of subcommand `name`, built from its module's function as typer builds it."""
    from typer.main import get_command_from_info
    from typer.models import CommandInfo

    module = importlib.import_module(f"{__name__}.{COMMANDS[name]}")
    return get_command_from_info(CommandInfo(name=name, callback=getattr(module, name)),
                                 pretty_exceptions_short=app.pretty_exceptions_short,
                                 rich_markup_mode=app.rich_markup_mode)


class _LazyCommands(MutableMapping):  # type: ignore[type-arg]
    """The group's name -> command mapping: every name of COMMANDS is there, built on first lookup."""

    def __init__(self, loaded: MutableMapping) -> None:  # type: ignore[type-arg]
        self._loaded = dict(loaded)

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = _load(name)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*COMMANDS, *self._loaded]))

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._loaded))

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]


class LazyGroup(TyperGroup):
    """typer's group whose subcommands are imported when looked up (see _LazyCommands)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(self.commands)


def _root() -> None:
    """Will this fine-tuning run fit on my GPU, how long will it take, which method should I use?"""


app = typer.Typer(cls=LazyGroup, callback=_root, add_completion=False, no_args_is_help=True,
                  help="Will this fine-tuning run fit on my GPU, how long will it take, which method should I use?")


def main() -> None:  # pragma: no cover
    app()
