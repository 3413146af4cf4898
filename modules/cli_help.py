"""`--<field>.help <class path>`: the arguments of any class a config can name, for every field.

jsonargparse answers `--model.init_args.objective.help modules.objectives.p3o.P3O` only for a field typed as a
class, and only once a config has named the stage: a reward (typed `Callable`, since a plain function is a reward
too), an evaluation's reward or judge (untyped), or any field before `--config`, got "not an argument" instead.
Here every such request is answered alike, with the options as they are written on the command line
(`--model.init_args.reward.init_args.field FIELD`), from the class's docstring; a function, which takes no
settings, gets its call and docstring. jsonargparse keeps `--<field>.help NAME` (a short name it resolves itself)
and `--print_config`.
"""
from __future__ import annotations

import inspect

from jsonargparse import ArgumentParser, DefaultHelpFormatter

from modules.checks import ConfigError, import_object


class RawDescription(DefaultHelpFormatter):
    """jsonargparse's help, with the description's line breaks kept (a docstring's summary as written)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def help_request(args: list[str]) -> tuple[str, str] | None:
    """The first `--<field>.help <dotted.path>` (or `=<dotted.path>`) in `args` as (field, path); else None."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not key.endswith(".help"):
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else ""
        if "." in value:
            return key.removesuffix(".help"), value
    return None


def load(path: str, option: str):
    """The class or function at `path` (`module.Name`); a ConfigError in one line if it does not import."""
    try:
        return import_object(path)
    except (ImportError, AttributeError, ValueError) as err:   # (an ImportError's message names the missing module)
        raise ConfigError(f"{option}: {path} does not import ({err})") from None


def class_help(field: str, path: str) -> str:
    """The help text for `--<field>.help <path>`: the class's arguments as options under `<field>.init_args`, or,
    for a function, how it is named in a config and how it is called."""
    option = f"--{field}.help"
    target = load(path, option)
    if inspect.isfunction(target):
        doc = inspect.getdoc(target) or "(no docstring)"
        try:
            signature = inspect.signature(target, eval_str=True)
        except Exception:                   # (an annotation that does not evaluate: shown as written)
            signature = inspect.signature(target)
        return (f"{path} is a function: it takes no settings; name it by its path alone, without init_args "
                f"({field.rpartition('.')[2]}: {path}).\nIt is called as {target.__name__}{signature}"
                f"\n\n{doc}")
    if not inspect.isclass(target):
        raise ConfigError(f"{option}: {path} is a {type(target).__name__}, not a class or a function")
    summary = (inspect.getdoc(target) or "").split("\n\n")[0]      # (jsonargparse would show its first line only)
    parser = ArgumentParser(prog="train.py", description=f"Help for {option}={path}\n\n{summary}", add_help=False,
                            exit_on_error=False, formatter_class=RawDescription)
    parser.add_class_arguments(target, nested_key=f"{field}.init_args", as_group=False, fail_untyped=False)
    return parser.format_help()
