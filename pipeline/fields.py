"""Settings fields that carry their own option name and help: where a setting is defined, once.

Every settings section is a frozen dataclass whose fields are made with `setting(...)` (name,
type, default, help, choices) and whose `__post_init__` validates them. From the sections,
`options` lists every setting as a flat `Option`; the command line's options (`add_options`) and
the Prefect flow's parameters (`signature`) are built from that list, and `build` makes the
sections back from flat values. Flat names are what users type: `--flag-quantile 0.9` and
`prefect deployment run clean/celeba --param flag_quantile=0.9`.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping

REQUIRED = dataclasses.MISSING


def setting(default: Any = REQUIRED, help: str = "", *, name: str | None = None,
            choices: tuple | None = None, aliases: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A dataclass field for a setting: its default, one line of help, the flat option name when
    it is not the field's own, the values allowed, other names, and whether the CLI shows it."""
    meta = {"help": help, "name": name, "choices": choices, "aliases": aliases, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type | None = None) -> Any:
    """A field holding a nested settings section: built from its own defaults when `cls` is
    given, else required (a section with a required setting)."""
    meta = {"section": True}
    return dataclasses.field(default_factory=cls, metadata=meta) if cls else dataclasses.field(metadata=meta)


@dataclass(frozen=True)
class Option:
    """One setting as users name it."""

    name: str  # flat name: the flow parameter, and --name-with-dashes on the command line
    path: tuple[str, ...]  # field names from the top section down to it
    type: Any  # the resolved annotation (int, float | None, ...)
    default: Any  # REQUIRED when the setting has no default
    help: str
    choices: tuple | None
    aliases: tuple[str, ...]
    cli: bool

    @property
    def base(self) -> type:
        """The value type without None: int for `int | None`."""
        if not self.optional:
            return self.type
        return next(a for a in typing.get_args(self.type) if a is not type(None))

    @property
    def optional(self) -> bool:
        """Whether the setting may be None (`X | None`)."""
        return typing.get_origin(self.type) in (typing.Union, types.UnionType) and \
            type(None) in typing.get_args(self.type)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def options(cls: type, path: tuple[str, ...] = ()) -> list[Option]:
    """Every setting of a section and its nested sections, in field order."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            out += options(hints[f.name], path + (f.name,))
        elif "help" in f.metadata:
            out.append(Option(f.metadata["name"] or f.name, path + (f.name,), hints[f.name], f.default,
                              f.metadata["help"], f.metadata["choices"], f.metadata["aliases"], f.metadata["cli"]))
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: two settings share a name: {sorted(n for n in names if names.count(n) > 1)}")
    return out


def build(cls: type, values: Mapping[str, Any], path: tuple[str, ...] = ()) -> Any:
    """A section from flat values (missing ones take their defaults); each section validates
    itself as it is built, inner sections first."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            kwargs[f.name] = build(hints[f.name], values, path + (f.name,))
        elif "help" in f.metadata:
            name = f.metadata["name"] or f.name
            if name in values:
                value = values[name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value  # tuples arrive as lists
    return cls(**kwargs)


def check_choices(obj: Any) -> None:
    """Raise ValueError for a setting of this section (not its nested ones) whose value is not
    one of its `choices`; None passes (it means unset)."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value is not None and value not in choices:
            name = (f.metadata["name"] or f.name).replace("_", "-")
            raise ValueError(f"--{name} {value!r} is not one of {choices}")


DEVICE_HELP = "where it runs: cpu, cuda or cuda:N (the CUDA device of index N)"


def check_device(value: str, option: str = "--device") -> None:
    """A device setting, checked the same everywhere: cpu, cuda or cuda:N (N a device index)."""
    kind, colon, index = str(value).partition(":")
    if not (value == "cpu" or (kind == "cuda" and (not colon or index.isdigit()))):
        raise ValueError(f"{option} {value!r} is not a device: cpu, cuda or cuda:N")


def flatten(obj: Any) -> dict[str, Any]:
    """The flat name -> value of every setting of a section (the resolved settings)."""
    out = {}
    for o in options(type(obj)):
        value = obj
        for step in o.path:
            value = getattr(value, step)
        out[o.name] = value
    return out


def unknown(cls: type, values: Mapping[str, Any]) -> list[str]:
    """Names in `values` that are no setting of `cls`."""
    known = {o.name for o in options(cls)}
    return sorted(set(values) - known)


def annotation(o: Option) -> Any:
    """The flow parameter's annotation: Literal[choices] (a list in Prefect's UI), None allowed
    where the setting may be unset."""
    base = Literal[o.choices] if o.choices else o.base  # type: ignore[valid-type]
    return base | None if o.optional else base


def signature(opts: list[Option]) -> inspect.Signature:
    """A keyword-only signature with one parameter per setting, required ones first."""
    params = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation(o),
                                **({} if o.default is REQUIRED else {"default": o.default})) for o in opts]
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)
    return inspect.Signature(params)


def add_options(parser: argparse.ArgumentParser, opts: list[Option], title: str | None = None,
                show_default: bool = True) -> None:
    """Command-line options for settings (bools are switches; required settings required)."""
    group = parser.add_argument_group(title) if title else parser
    for o in opts:
        if not o.cli:
            continue
        flags = [o.flag] + ["--" + a.replace("_", "-") for a in o.aliases]
        if o.base is bool:
            group.add_argument(*flags, dest=o.name, action="store_true", help=o.help)
            continue
        if typing.get_origin(o.base) is tuple:
            group.add_argument(*flags, dest=o.name, type=typing.get_args(o.base)[0], nargs="+",
                               default=o.default, help=f"{o.help} (default {' '.join(map(str, o.default))})")
            continue
        kind = o.base
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # e.g. float | str: the first that parses
            kind = _first_that_parses(typing.get_args(kind))
        default = "" if o.default is REQUIRED or o.default is None or not show_default else f" (default {o.default})"
        group.add_argument(*flags, dest=o.name, type=kind, choices=o.choices, required=o.default is REQUIRED,
                           default=None if o.default is REQUIRED else o.default, help=o.help + default)


def _first_that_parses(kinds: tuple[type, ...]) -> Any:
    """An argparse type for a union setting (float | str): the value as the first type that takes it."""
    def parse(text: str) -> Any:
        for k in kinds:
            try:
                return k(text)
            except (TypeError, ValueError):
                continue
        raise argparse.ArgumentTypeError(f"{text!r} is none of {[k.__name__ for k in kinds]}")
    parse.__name__ = " or ".join(k.__name__ for k in kinds)
    return parse


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """A section from parsed command-line options (those the parser has)."""
    values = {o.name: getattr(args, o.name) for o in options(cls) if hasattr(args, o.name)}
    return build(cls, values)
