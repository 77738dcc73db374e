"""Settings fields: one definition gives the CLI option, the flow parameter and the validation."""
import argparse
import inspect
from dataclasses import dataclass
from typing import Literal

import pytest

from pipeline.fields import REQUIRED, add_options, build, flatten, from_args, options, section, setting, signature, unknown


@dataclass(frozen=True)
class Inner:
    level: int = setting(3, "how much", name="inner_level")
    mode: str = setting("a", "which", choices=("a", "b"), aliases=("style",))

    def __post_init__(self):
        if self.level < 0:
            raise ValueError("level must be >= 0")


@dataclass(frozen=True)
class Outer:
    path: str = setting(help="required")
    inner: Inner = section(Inner)
    flag: bool = setting(False, "a switch")
    sizes: tuple[int, ...] = setting((1, 2), "widths")
    maybe: float | None = setting(None, "optional")
    hidden: int = setting(7, "internal", cli=False)


def test_options_are_flat_with_paths_types_and_defaults():
    opts = {o.name: o for o in options(Outer)}
    assert list(opts) == ["path", "inner_level", "mode", "flag", "sizes", "maybe", "hidden"]
    assert opts["inner_level"].path == ("inner", "level") and opts["inner_level"].base is int
    assert opts["path"].default is REQUIRED and opts["maybe"].optional and opts["maybe"].base is float
    assert opts["mode"].flag == "--mode" and opts["inner_level"].flag == "--inner-level"


def test_build_flatten_round_trip_and_validation():
    o = build(Outer, {"path": "p", "inner_level": 5, "sizes": [4, 8]})
    assert o.inner.level == 5 and o.sizes == (4, 8) and o.inner.mode == "a"
    assert build(Outer, flatten(o)) == o
    with pytest.raises(ValueError, match="level"):
        build(Outer, {"path": "p", "inner_level": -1})
    assert unknown(Outer, {"path": "p", "nope": 1}) == ["nope"]


def test_command_line_options_come_from_the_fields():
    p = argparse.ArgumentParser()
    add_options(p, options(Outer))
    args = p.parse_args(["--path", "x", "--style", "b", "--flag", "--sizes", "3", "4", "--inner-level", "2"])
    o = from_args(Outer, args)
    assert (o.path, o.inner.mode, o.flag, o.sizes, o.inner.level, o.hidden) == ("x", "b", True, (3, 4), 2, 7)
    with pytest.raises(SystemExit):
        p.parse_args([])  # --path is required
    with pytest.raises(SystemExit):
        p.parse_args(["--path", "x", "--mode", "c"])  # not a choice
    assert "--hidden" not in p.format_help()


def test_the_flow_signature_comes_from_the_fields():
    sig = signature(options(Outer))
    params = sig.parameters
    assert params["path"].default is inspect.Parameter.empty and list(params)[0] == "path"
    assert params["mode"].annotation == Literal["a", "b"] and params["inner_level"].default == 3
    assert params["maybe"].annotation == (float | None)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_two_settings_may_not_share_a_name():
    @dataclass(frozen=True)
    class Clash:
        a: int = setting(1, "x", name="same")
        b: int = setting(2, "y", name="same")

    with pytest.raises(TypeError, match="share a name"):
        options(Clash)
