"""Options declared once, on the dataclass field they fill: flag, type, default and help together.

    @dataclass(frozen=True)
    class LoadOptions:
        mem_budget: Budget | None = option("--mem-budget", None, Budget.parse, help="...")

    add_options(parser, ModeOptions)          # the flags, on an argparse parser (groups as titled)
    options = options_of(ModeOptions, args)   # the typed dataclass tree from what argparse parsed
    argv(options)                             # back to command-line words (bench launches ranks)

A field's flag, its parser (text -> typed value, checked where it is parsed) and its formatter
(typed value -> text) live on the field, so a reader follows an option from the command line to
the code that reads the field, and `argv` can never name a flag the parser does not know: a
renamed option is renamed everywhere. A nested dataclass field (`group`) is a titled group of
options; its fields' argparse destinations are dotted paths (`load.mem_budget`).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass

from ..errors import HaloError


@dataclass(frozen=True)
class Flag:
    name: str                                   # "--mem-budget"
    help: str
    parse: Callable[[str], object] = str        # text -> typed value; raises on a bad one
    format: Callable[[object], str] = str       # typed value -> text that `parse` takes back
    choices: tuple | None = None
    metavar: str | None = None
    switch: bool = False                        # a flag without a value: True when given
    also: tuple[tuple[str, object], ...] = ()   # other flags that set a fixed value ("--no-prefetch", "off")


def option(name: str, default, parse: Callable[[str], object] = str, *, help: str,
           format: Callable[[object], str] = str, choices: tuple | None = None,
           metavar: str | None = None, also: tuple = ()) -> Field:
    """A field with a command-line flag taking one value (a dict default is copied per instance)."""
    flag = Flag(name, help, parse, format, choices, metavar, also=also)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"flag": flag})
    return field(default=default, metadata={"flag": flag})


def switch(name: str, *, help: str) -> Field:
    """A bool field, False unless the flag is given."""
    return field(default=False, metadata={"flag": Flag(name, help, switch=True)})


def group(cls, title: str) -> Field:
    """A nested dataclass of options, shown under `title` in --help."""
    return field(default_factory=cls, metadata={"group": title})


def _typed(flag: Flag) -> Callable[[str], object]:
    """argparse's `type`: the flag's parser, its errors as argparse's one-line ones."""
    def parse(text: str):
        try:
            return flag.parse(text)
        except (HaloError, ValueError) as e:
            message = str(e)
            prefix = f"{flag.name} "
            raise argparse.ArgumentTypeError(message[len(prefix):] if message.startswith(prefix)
                                             else message) from None
    parse.__name__ = flag.name     # argparse names it in "invalid <type> value"
    return parse


def flagged(cls, prefix: str = "") -> Iterable[tuple[str, Field, Flag]]:
    """(dotted path, field, flag) of every flagged field of cls and its groups, in order."""
    for f in fields(cls):
        if "group" in f.metadata:
            yield from flagged(f.default_factory, f"{prefix}{f.name}.")
        elif "flag" in f.metadata:
            yield f"{prefix}{f.name}", f, f.metadata["flag"]


def _default(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


def add_options(parser, cls, only: set[str] | None = None, groups: bool = True, prefix: str = ""):
    """Every flagged field of cls (or the dotted paths in `only`) as an argument of `parser`;
    with `groups`, a nested dataclass's options under its own titled argument group."""
    for f in fields(cls):
        path = prefix + f.name
        if "group" in f.metadata:
            inner = f.default_factory
            if only is not None and not any(p.startswith(path + ".") for p in only):
                continue
            target = parser.add_argument_group(f.metadata["group"]) if groups else parser
            add_options(target, inner, only, groups=False, prefix=path + ".")
        elif "flag" in f.metadata and (only is None or path in only):
            _add_flag(parser, path, f.metadata["flag"], _default(f))


def _add_flag(parser, dest: str, flag: Flag, default):
    if flag.switch:
        parser.add_argument(flag.name, dest=dest, action="store_true", help=flag.help)
        return
    shown = "" if default is None else f" (default: {flag.format(default)})"
    # argparse's own metavar (dest upper-cased) would read TENSOR.SPIN_US: name it from the flag
    metavar = flag.metavar or (None if flag.choices else flag.name[2:].upper().replace("-", "_"))
    parser.add_argument(flag.name, dest=dest, type=_typed(flag), default=default,
                        choices=flag.choices, metavar=metavar,
                        help=flag.help.replace("%", "%%") + shown)
    for name, value in flag.also:
        parser.add_argument(name, dest=dest, action="store_const", const=value,
                            help=f"the same as {flag.name} {flag.format(value)}")


def options_of(cls, namespace: argparse.Namespace, prefix: str = ""):
    """cls filled from parsed arguments: each field from its flag's destination, groups nested;
    a field whose flag this parser did not take keeps its default."""
    values = {}
    for f in fields(cls):
        path = prefix + f.name
        if "group" in f.metadata:
            values[f.name] = options_of(f.default_factory, namespace, path + ".")
        elif "flag" in f.metadata and hasattr(namespace, path):
            values[f.name] = getattr(namespace, path)
    return cls(**values)


def argv(options, only: set[str] | None = None) -> list[str]:
    """The command-line words that give `options` back (fields at their default are left out)."""
    if not is_dataclass(options):
        raise TypeError(f"argv: {options!r} is not a dataclass of options")
    words: list[str] = []
    for path, f, flag in flagged(type(options)):
        if only is not None and path not in only:
            continue
        value = options
        for name in path.split("."):
            value = getattr(value, name)
        if value == _default(f):
            continue
        if flag.switch:
            words.append(flag.name)
        else:
            words += [flag.name, flag.format(value)]
    return words
