"""Typed settings that derive their own CLI flags, argv and error messages.

A setting is a pydantic field made with `setting(...)`: its default, help text, bounds
(`ge`/`le`/`gt`) and choices (a `Literal` annotation) are written once. From the model
`add_arguments` builds the argparse flags, `to_argv` writes the argument list that
reproduces a value, and construction turns pydantic's errors into one `UserError`
naming the flags at fault. Flag names default to `--field-name`.
"""

from __future__ import annotations

import argparse
import copy
import os
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from speculators.errors import UserError


def setting(default: Any = ..., help: str = "", *, flag: str | None = None, group: str = "",
            title: str = "", negate: bool = False, repeat: bool = False, cli: bool = True,
            **constraints: Any) -> Any:
    """A pydantic field with CLI metadata.

    `flag`: the CLI flag (default `--name-with-dashes`); `group`: the argparse group;
    `title`: the label a form shows; `negate`: a bool whose flag is a store_false switch
    (e.g. `--no-resume-from-checkpoint` for `resume`); `repeat`: a list given by repeating
    the flag (`--data A --data B`); `cli=False`: a setting with no flag (set by code).
    """
    extra = {"flag": flag, "group": group, "negate": negate, "repeat": repeat, "cli": cli}
    return Field(default, description=help, title=title or None, json_schema_extra=extra, **constraints)


_CONSTRAINTS = ("ge", "le", "gt", "lt", "min_length", "max_length")


def from_field(model: type[BaseModel], name: str, **override: Any) -> FieldInfo:
    """A new field with `model`'s field `name`'s default, bounds, help, label and flag metadata,
    for another model; `override` replaces `default`, `title`, `description` or `json_schema_extra`."""
    info = model.model_fields[name]
    kwargs: dict[str, Any] = {"default": info.default, "description": info.description, "title": info.title,
                              "json_schema_extra": copy.deepcopy(info.json_schema_extra)}
    for constraint in info.metadata:
        found = {k: getattr(constraint, k) for k in _CONSTRAINTS if getattr(constraint, k, None) is not None}
        if not found:
            raise TypeError(f"{model.__name__}.{name}: from_field cannot copy the constraint {constraint!r}")
        kwargs.update(found)
    kwargs.update(override)
    return Field(**kwargs)


def cli_fields(model: type[BaseModel]) -> list[str]:
    """The fields of `model` that are command-line flags."""
    return [n for n, f in model.model_fields.items() if _meta(f).get("cli", True)]


def _meta(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def flag_of(model: type[BaseModel], name: str) -> str:
    flag = _meta(model.model_fields[name]).get("flag")
    return flag or "--" + name.replace("_", "-")


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None`."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def choices_of(annotation: Any) -> tuple[Any, ...] | None:
    inner, _ = unwrap_optional(annotation)
    return get_args(inner) if get_origin(inner) is Literal else None


def bounds_of(info: FieldInfo) -> dict[str, Any]:
    """{'ge': .., 'le': .., 'gt': .., 'lt': ..} from the field's constraints."""
    out: dict[str, Any] = {}
    for m in info.metadata:
        for key in ("ge", "le", "gt", "lt"):
            value = getattr(m, key, None)
            if value is not None:
                out[key] = value
    return out


def describe_bounds(info: FieldInfo) -> str:
    b = bounds_of(info)
    lo = f"[{b['ge']}" if "ge" in b else (f"({b['gt']}" if "gt" in b else "")
    hi = f"{b['le']}]" if "le" in b else (f"{b['lt']})" if "lt" in b else "")
    if lo and hi:
        return f"{lo}, {hi}"
    if lo:
        return f">= {b['ge']}" if "ge" in b else f"> {b['gt']}"
    if hi:
        return f"<= {b['le']}" if "le" in b else f"< {b['lt']}"
    return ""


def field_message(model: type[BaseModel], name: str, value: Any, pydantic_msg: str) -> str:
    """The per-field message shown by the CLI and the form: what is allowed, what was given."""
    info = model.model_fields.get(name)
    if info is None:
        return pydantic_msg
    choices = choices_of(info.annotation)
    if choices:
        return f"choose one of {', '.join(map(str, choices))} (got {value!r})"
    inner, _ = unwrap_optional(info.annotation)
    span = describe_bounds(info)
    b = bounds_of(info)
    if inner is int and "ge" in b and "le" in b:
        return f"must be a whole number between {b['ge']} and {b['le']} (got {value!r})"
    # "in (0.0, 1.0]" for an interval, ">= 0" alone for one bound
    where = f" in {span}" if span[:1] in "([" else f" {span}" if span else ""
    if inner is int:
        return f"must be a whole number{where} (got {value!r})"
    if inner is float:
        return f"must be a number{where} (got {value!r})"
    return f"{pydantic_msg} (got {value!r})"


class SettingsError(UserError):
    """Bad settings: the message names each flag; `errors` maps field -> message (for forms)."""

    def __init__(self, message: str, errors: dict[str, str]):
        super().__init__(message)
        self.errors = errors


class TypedSettings(BaseModel):
    """Base of every settings model: unknown keys refused, values checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            errors = self.field_errors(exc)
            raise SettingsError(self.explain(errors), errors) from None

    @model_validator(mode="before")
    @classmethod
    def _paths_as_text(cls, data: Any) -> Any:
        """Paths (`pathlib.Path`) are accepted where a setting is text, as the CLI gives it."""
        if not isinstance(data, dict):
            return data

        def text(v: Any) -> Any:
            if isinstance(v, os.PathLike):
                return os.fspath(v)
            if isinstance(v, (list, tuple)):
                return [text(x) for x in v]
            return v

        return {k: text(v) for k, v in data.items()}

    @classmethod
    def field_errors(cls, exc: ValidationError) -> dict[str, str]:
        """{field: message} for each field pydantic refused (first error per field)."""
        errors: dict[str, str] = {}
        for err in exc.errors():
            loc = err.get("loc") or ("",)
            name = str(loc[0])
            if name in errors:
                continue
            value = err.get("input")
            if err.get("type") == "extra_forbidden":
                errors[name] = "unknown setting"
            elif err.get("type") == "missing":
                errors[name] = "required"
            elif err.get("type") == "value_error":
                errors[name] = str(err.get("ctx", {}).get("error") or err.get("msg"))
            else:
                errors[name] = field_message(cls, name, value, err.get("msg", "invalid"))
        return errors

    @classmethod
    def explain(cls, errors: dict[str, str]) -> str:
        return "; ".join(f"{cls.flag(k)} {m}" if k in cls.model_fields else f"{k} {m}".strip()
                         for k, m in errors.items())

    @classmethod
    def errors_of(cls, data: dict[str, Any]) -> tuple[Any, dict[str, str]]:
        """Validate `data`; return (instance or None, {field: message}) for per-field display."""
        try:
            return cls.model_validate(data), {}
        except SettingsError as exc:  # pydantic runs our __init__ when validating
            return None, dict(exc.errors)
        except ValidationError as exc:
            return None, cls.field_errors(exc)

    @classmethod
    def flag(cls, name: str) -> str:
        return flag_of(cls, name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> Any:
        """The parsed flags (from `add_arguments(parser, cls)`) as a checked instance; `extra`
        sets the fields that have no flag. Bad values: one UserError naming each flag."""
        values = {k: getattr(args, k) for k in cli_fields(cls) if hasattr(args, k)}
        # a required setting no flag gave is reported as missing, not as a wrong type
        values = {k: v for k, v in values.items() if v is not None or not cls.model_fields[k].is_required()}
        return cls(**values, **extra)


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], names: list[str] | None = None,
                  groups: dict[str, argparse._ArgumentGroup] | None = None) -> None:
    """argparse flags for `names` (default: every field) of `model`, from its fields.

    Parsing only converts types; bounds are checked when the model is built, so the CLI and
    every other client get the same messages.
    """
    groups = groups if groups is not None else {}
    parser.set_defaults(settings_model=model)  # a --config file is checked with the same model
    for name in names or cli_fields(model):
        info = model.model_fields[name]
        meta = _meta(info)
        group_name = meta.get("group") or "options"
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        g = groups[group_name]
        flag = flag_of(model, name)
        inner, _ = unwrap_optional(info.annotation)
        help_text = info.description or ""
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        if default is not None and help_text and not meta.get("negate") and inner is not bool:
            help_text += f" (default {default})"
        kw: dict[str, Any] = {"dest": name, "help": help_text}
        if meta.get("repeat"):
            g.add_argument(flag, action="append", required=required, default=None if required else default,
                           metavar=name.rsplit("_", 1)[-1].upper(), **kw)
            continue
        if inner is bool:
            if meta.get("negate"):
                g.add_argument(flag, action="store_false", default=default, **kw)
            else:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        choices = choices_of(info.annotation)
        if choices:
            kw["choices"] = list(choices)
            if all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
                kw.update(type=int, metavar="{" + ",".join(map(str, choices)) + "}")
        elif get_origin(inner) is list:
            (item,) = get_args(inner)
            kw.update(nargs="+", type=item, metavar="N")
        elif inner in (int, float):
            kw.update(type=inner, metavar="N" if inner is int else "X")
        else:
            kw["metavar"] = name.rsplit("_", 1)[-1].upper()
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
        g.add_argument(flag, **kw)


def to_argv(obj: BaseModel, names: list[str] | None = None, *, only_changed: bool = True) -> list[str]:
    """Flags that reproduce `obj`'s values (`--flag=value` so no value can read as a flag)."""
    model = type(obj)
    argv: list[str] = []
    for name in names or cli_fields(model):
        info = model.model_fields[name]
        value = getattr(obj, name)
        required = info.is_required()
        if only_changed and not required and value == info.get_default(call_default_factory=True):
            continue
        flag = flag_of(model, name)
        inner, _ = unwrap_optional(info.annotation)
        if inner is bool:
            if _meta(info).get("negate"):
                if not value:
                    argv.append(flag)
            else:
                argv.append(flag if value else "--no-" + flag[2:])
            continue
        if value is None:
            continue  # None is every optional flag's default: nothing to pass
        if _meta(info).get("repeat"):
            argv += [f"{flag}={v}" for v in ([value] if isinstance(value, str) else value)]
            continue
        if isinstance(value, (list, tuple)):
            if value:
                argv += [flag, *[str(v) for v in value]]  # nargs: ints only, never start with '-'
            continue
        text = repr(value) if isinstance(value, float) else str(value)
        argv.append(f"{flag}={text}")
    return argv


def explicit_argv(obj: BaseModel) -> list[str]:
    """Flags for the fields that were given when `obj` was built (in the model's order),
    defaults included: a command line that says what its caller chose."""
    chosen = [n for n in cli_fields(type(obj)) if n in obj.model_fields_set]
    return to_argv(obj, chosen, only_changed=False) if chosen else []
