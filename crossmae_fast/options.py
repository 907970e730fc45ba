"""Command-line options and config files generated from dataclass configs (for every CLI).

A config class is a dataclass whose fields are sections (dataclasses, e.g. `RunConfig.model`) or
plain values. Each plain field of a section becomes one flat option, `--mask-ratio` for
`mask_ratio`, with the field's `metadata["help"]` and `metadata["choices"]`; booleans get
`--x/--no-x`, tuples take several values, `metadata["const"]` is the value of a bare `--option`,
and fields with `metadata["follows"]` are set through the section they follow. Flat names are
unique across sections, so a file may be nested by section or flat. New fields become options
without touching any CLI. Use:

    ap = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)  # unset options stay absent
    add_options(ap, RunConfig, sections=("data",), defaults=run_config().to_dict())
    ns = vars(ap.parse_args(argv))
    values = merge(read_file(path, RunConfig), from_namespace(ns, RunConfig))  # command line wins
    cfg = run_config(values)

Nothing here knows about a particular config; `crossmae_fast.config` holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option: its section (None for a plain field of the config class itself) and field."""

    section: str | None
    field: dataclasses.Field
    kind: type
    nargs: int | str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.name.replace("_", "-")


def _kind(hint) -> tuple[type, int | str | None]:
    """(element type, number of values: a count, "+" for a variable-length tuple, None for one value)
    of a field's type hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return args[0], ("+" if args[-1] is Ellipsis else len(args))
    return hint, None


def leaves(cls, sections: Iterable[str] | None = None) -> dict[str, Leaf]:
    """Flat option name (`mask_ratio`) -> `Leaf` for every settable field of `cls` (of `sections`)."""
    out: dict[str, Leaf] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            if sections is not None and f.name not in sections:
                continue
            sub_hints = typing.get_type_hints(hints[f.name])
            items = [(f.name, g, sub_hints[g.name]) for g in dataclasses.fields(hints[f.name])]
        else:
            items = [(None, f, hints[f.name])]
        for section, g, hint in items:
            if g.metadata.get("follows"):
                continue
            if g.name in out:
                raise TypeError(f"option name {g.name!r} appears in two sections of {cls.__name__}")
            out[g.name] = Leaf(section, g, *_kind(hint))
    return out


def add_options(parser: argparse.ArgumentParser, cls, sections: Iterable[str] | None = None,
                defaults: Mapping | None = None, skip: Iterable[str] = ()) -> None:
    """Add one option per field of `cls` (of `sections`, except `skip`) to `parser`, which should use
    `argument_default=argparse.SUPPRESS`. `defaults` (nested like the config) are shown in the help."""
    for name, leaf in leaves(cls, sections).items():
        if name in skip:
            continue
        meta, f = leaf.field.metadata, leaf.field
        shown = _lookup(defaults, leaf) if defaults is not None else f.default
        help_text = meta.get("help", "")
        if shown is not None and not isinstance(shown, bool):
            help_text += f" (default: {' '.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
        kw = dict(help=help_text.replace("%", "%%"), dest=name)
        if leaf.kind is bool:
            parser.add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **kw)
        elif "const" in meta and meta["const"] is not None:
            parser.add_argument(leaf.flag, nargs="?", const=meta["const"], metavar=f"{meta['const']}|VALUE", **kw)
        else:
            metavar = None if meta.get("choices") else {int: "N", float: "X"}.get(leaf.kind, name.upper())
            parser.add_argument(leaf.flag, type=leaf.kind, choices=meta.get("choices"), nargs=leaf.nargs,
                                metavar=metavar, **kw)


def _lookup(values: Mapping, leaf: Leaf):
    section = values.get(leaf.section, {}) if leaf.section else values
    return section.get(leaf.field.name, leaf.field.default)


def _coerce(value, leaf: Leaf):
    """Numbers to the field's type: strings from a file (YAML reads `1e-3` as one), ints for floats."""
    if leaf.nargs is not None and isinstance(value, list):
        return tuple(_coerce(v, dataclasses.replace(leaf, nargs=None)) for v in value)
    if leaf.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if leaf.kind in (int, float) and isinstance(value, str):
        try:
            return leaf.kind(value)
        except ValueError:
            raise ValueError(f"{leaf.field.name}={value!r} is not a number") from None
    return value


def nest(cls, values: Mapping) -> dict:
    """Nested `{section: {field: value}}` from `values` nested by section, flat, or both; keys may use
    '-' or '_'. Unknown keys raise ValueError naming them."""
    index = leaves(cls)
    sections = {leaf.section for leaf in index.values()} - {None}
    out: dict = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in sections and isinstance(value, Mapping):
            for sub, v in value.items():
                leaf = index.get(sub.replace("-", "_"))
                if leaf is None or leaf.section != key:
                    raise ValueError(f"unknown option {key}.{sub}" + _follower_hint(cls, key, sub))
                out.setdefault(key, {})[leaf.field.name] = _coerce(v, leaf)
        elif key in index:
            leaf = index[key]
            target = out.setdefault(leaf.section, {}) if leaf.section else out
            target[key] = _coerce(value, leaf)
        else:
            raise ValueError(f"unknown option {key}")
    return out


def _follower_hint(cls, section: str, name: str) -> str:
    hints = typing.get_type_hints(cls)
    sub = hints.get(section)
    for g in dataclasses.fields(sub) if dataclasses.is_dataclass(sub) else ():
        if g.name == name.replace("-", "_") and g.metadata.get("follows"):
            return f" (it follows {g.metadata['follows']}.{g.name}; set that)"
    return ""


def merge(base: Mapping, over: Mapping) -> dict:
    """`base` updated by `over`, section by section (`over` wins)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = dict(v) if isinstance(v, Mapping) else v
    return out


def settable(cls, values: Mapping) -> dict:
    """Nested `values` (say `cfg.to_dict()`) without the fields that are not options (those that
    follow another section): what a config file holds."""
    index = leaves(cls)
    out: dict = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = {k: v for k, v in value.items() if k in index and index[k].section == key}
        elif key in index:
            out[key] = value
    return out


def from_namespace(ns: Mapping, cls) -> dict:
    """Nested values of the options given on the command line (`vars(parser.parse_args())` with
    SUPPRESS defaults); keys that are not config fields (say `config`) are ignored."""
    index = leaves(cls)
    return nest(cls, {k: v for k, v in ns.items() if k in index})


def read_file(path: str | Path, cls) -> dict:
    """Nested values from a YAML (.yaml/.yml) or JSON file holding a mapping, nested or flat."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    try:
        return nest(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
