"""jsonargparse's refusal of a config file or a command line, as one line.

A misspelt key, a value of the wrong type or a class path that does not import makes jsonargparse print the whole
usage (50 lines) and a nested report of every union alternative it tried, ending with the whole parsed config. The
line `one_line` makes of that report names the field, what is wrong with it, the nearest valid key for a misspelt
one and where it was given:

    model.init_args.sampling.temp: modules.sampling.SamplingConfig has no argument 'temp'; did you mean
    'temperature'? (in mine.yaml)

`train.py`'s parser prints it in place of jsonargparse's report. A report this module cannot read (another shape,
from a newer jsonargparse) is printed whole, on one line, without the usage and the parsed config.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from dataclasses import dataclass, field

import yaml

from modules.checks import import_class

PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)')
CLASS = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)")
OPTION = re.compile(r"Option '([^']+)' is not accepted")
GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
SUBCOMMAND = re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'")
UNRECOGNIZED = re.compile(r"unrecognized arguments: --?([^=\s]+)")
EXPECTED = re.compile(r"Expected a (?:<class '([\w.]+)'>|(.+?))\. Got value: (.*)")
ALTERNATIVE = re.compile(r"Expected a (?:<class '([\w.]+)'>|(.+))$")                # one type of a union
CALLABLE = re.compile(r"Type .+? expects a function or a callable class: (.*?)\.? Got value: (.*)")
# Lines about the alternatives jsonargparse tried and the value it was given: never the reason.
NOISE = re.compile(r"Given value|Subtypes:|Does not validate against|Expected a <class 'NoneType'>|Not a valid subclass"
                   r"|Subclass types expect|- a class path|- a dict|Expected a path but")


@dataclass
class _Node:
    text: str
    indent: int
    children: list[_Node] = field(default_factory=list)


def _tree(message: str) -> list[_Node]:
    """The report's lines as a tree by indentation (a `- ` item's text without its dash)."""
    root = _Node("", -1)
    stack = [root]
    for line in message.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if text.startswith("- "):           # an item: its continuation lines, under its text, are its children
            text, indent = text[2:], indent + 1
        while stack[-1].indent >= indent:
            stack.pop()
        node = _Node(text, indent)
        stack[-1].children.append(node)
        stack.append(node)
    return root.children


@dataclass
class Problem:
    path: str                       # dotted field, as in the YAML
    reason: str
    key: str | None = None          # a key nothing accepts: the last part of `path`
    choices: tuple[str, ...] = ()   # the keys its parent accepts
    listed: bool = True             # say `choices` when none is near (not a module's names)


def arguments_of(cls) -> tuple[str, ...]:
    """The keyword arguments a class takes: a dataclass's fields, else its constructor's named parameters."""
    if cls is None:
        return ()
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _group_type(cls, name: str):
    """The dataclass a class's argument `name` is typed with (through Optional), or None."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(name)
    except Exception:                       # an annotation that does not resolve: no suggestion, not an error
        return None
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _find(nodes: list[_Node], path: str, owner, owner_path: str) -> Problem | None:
    """The first reason in `nodes` (the report below `path`, inside the class `owner` configured at `owner_path`)."""
    for node in nodes:
        text = node.text
        if NOISE.match(text):
            continue
        if text == "Errors:":
            types = [ALTERNATIVE.match(c.text) for c in node.children if not NOISE.match(c.text)]
            given = next((n.text.removeprefix("Given value: ") for n in nodes if n.text.startswith("Given value: ")), "")
            if types and all(types):        # a union of plain types (trainer.precision): each, and the value
                names = " or ".join((t[1] or t[2]).removeprefix("typing.") for t in types)
                found = Problem(path, f"expected {names}, got {given!r}")
            else:
                found = _find(node.children, path, owner, owner_path)
        elif match := PARSER_KEY.match(text):
            key = match[1]
            listed = any(c.text == "Given value type: <class 'list'>" for c in node.children)
            rest = [_Node(match[2], node.indent + 1)] if match[2] else []
            found = _find(rest + node.children, f"{path}.{key}" if path else key, owner, owner_path)
            if found and listed:            # a list (trainer.callbacks): the item by its class, not `init_args`
                found.path = found.path.replace(f"{key}.init_args.", f"{key}[...].init_args.", 1)
        elif match := CLASS.match(text):
            cls = import_class(match[1])
            inner = path if cls is None or dataclasses.is_dataclass(cls) else f"{path}.init_args"
            rest = [_Node(match[2], node.indent + 1)] if match[2] else []
            found = _find(rest + node.children, inner, cls, match[1])
            if found is None or (found.path == inner and found.key is None):
                found = _class_problem(path, match[1], found.reason if found else "cannot be used")
        elif match := OPTION.match(text):
            found = Problem(f"{path}.{match[1]}", f"{owner_path} has no argument {match[1]!r}", match[1],
                            arguments_of(owner))
        elif match := GROUP.match(text):
            group, key = match[1], match[2]
            found = Problem(f"{path}.{group}.{key}", f"{owner_path}'s {group} has no field {key!r}", key,
                            arguments_of(_group_type(owner, group)))
        elif match := UNRECOGNIZED.match(text):
            *groups, key = match[1].split(".")
            kind = _group_type(owner, groups[0]) if len(groups) == 1 else None if groups else owner
            found = Problem(".".join([path, *groups, key]), f"not an argument of {owner_path}"
                            + (f"'s {groups[0]}" if groups else ""), key, arguments_of(kind))
        elif match := CALLABLE.match(text):   # a class given for a callable (reward, optimizer): its own reason
            given = re.search(r"class_path='([^']+)'", match[2])
            cls = given[1] if given else match[2]
            inner = _find([_Node(match[1], node.indent + 1)], f"{path}.init_args", import_class(cls), cls)
            found = inner if inner and inner.key else _class_problem(path, cls, match[1])
        elif match := EXPECTED.match(text):
            found = Problem(path, f"expected {(match[1] or match[2]).removeprefix('typing.')}, got {match[3]!r}")
        else:                               # a reason of another shape: all of it, on one line
            found = Problem(path, " ".join([text, *_texts(node.children)]))
        if found is not None:
            return found
    return None


def _texts(nodes: list[_Node]) -> list[str]:
    return [t for n in nodes if not NOISE.match(n.text) for t in (n.text, *_texts(n.children))]


def _class_problem(path: str, class_path: str, reason: str) -> Problem:
    """What is wrong with a class given by path (most often: it does not import); for a module without that name,
    the module's names to suggest from."""
    problem = Problem(path, f"{class_path}: {reason}")
    if missing := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", reason):
        try:
            names = tuple(n for n in dir(importlib.import_module(missing[1])) if not n.startswith("_"))
        except ImportError:
            names = ()
        problem.key, problem.choices, problem.listed = missing[2], names, False
    return problem


def where_given(path: str, args: list[str]) -> str | None:
    """'on the command line' or 'in <file>' (the last `--config` file holding `path`), or None. An option naming
    the field (or a field below it) wins; then the files; then an option naming a block above it (`--model=...`)."""
    bare = path.replace(".init_args", "").replace("[...]", "")
    options = [arg[2:].partition("=")[0].removesuffix("+").replace(".init_args", "") for arg in args
               if arg.startswith("--") and not arg.startswith("--config")]
    if any(o == bare or o.startswith(bare + ".") for o in options):
        return "on the command line"
    for name in reversed(config_files(args)):
        try:
            with open(name) as handle:
                node = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError):
            continue
        if _holds(node, path.replace("[...]", "").split(".")):
            return f"in {name}"
    if any(o and bare.startswith(o + ".") for o in options):
        return "on the command line"
    return None


def _holds(node, keys: list[str]) -> bool:
    if not keys:
        return True
    if isinstance(node, list):
        return any(_holds(item, keys) for item in node)
    return isinstance(node, dict) and keys[0] in node and _holds(node[keys[0]], keys[1:])


def _option(key: str, options: tuple[str, ...]) -> Problem:
    """A key the parser itself has no option for: compared with its siblings (`trainer.max_epoch`), or by its
    first part when that is unknown too (`modle.init_args...`)."""
    parent, _, last = key.rpartition(".")
    siblings = tuple(o.rpartition(".")[2] for o in options if o.rpartition(".")[0] == parent)
    if siblings or not parent:
        return Problem(key, "not an option of train.py", last, siblings)
    head = key.split(".")[0]
    return Problem(head, "not an option of train.py", head, tuple(dict.fromkeys(o.split(".")[0] for o in options)))


def nearest(key: str, choices: tuple[str, ...]) -> str | None:
    """The choice `key` most likely misspells: the closest by difflib, else one it shortens or extends
    ('temp' -> 'temperature')."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
    if close:
        return lower[close[0]]
    related = [c for c in choices if len(key) >= 3 and (c.startswith(key) or key.startswith(c))]
    return min(related, key=lambda c: abs(len(c) - len(key))) if related else None


def config_files(args: list[str]) -> list[str]:
    """The `--config` / `-c` files among `args`, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def unreadable_config(args: list[str]) -> str | None:
    """The first `--config` file that is not YAML, or not a mapping of settings, as one line (jsonargparse names
    neither the file nor, for an empty one, the reason); None when every one reads."""
    for name in config_files(args):
        try:
            with open(name) as handle:
                node = yaml.safe_load(handle)
        except OSError:
            continue                                # jsonargparse's own message names a missing file
        except yaml.YAMLError as err:
            return f"--config {name}: not valid YAML: {' '.join(str(err).split())}"
        if not isinstance(node, dict):
            what = "is empty" if node is None else f"holds a {type(node).__name__}"
            return f"--config {name}: {what}; expected a mapping of settings (trainer:, model:, data:, ...)"
    return None


def one_line(message: str, args: list[str], options: tuple[str, ...] = ()) -> str:
    """jsonargparse's error `message` about `args` as one line (see the module docstring). `options`: the keys of
    the parser that refused them (`trainer.max_epochs`, ...), for a misspelt top-level one."""
    top = message.strip()
    if top.startswith(("Problems parsing config", "Unexpected config")) and (bad := unreadable_config(args)):
        return bad
    if match := SUBCOMMAND.match(top) or UNRECOGNIZED.match(top):
        found = _option(match[1], options)
    else:
        found = _find(_tree(message), "", None, "")
    if found is None or not found.path:             # no field named: the whole report
        found = Problem("", " ".join(_texts(_tree(message))))
    see = "python train.py --help" if "subcommand" in found.reason else "python train.py fit --help"
    where = "--config" if found.path == "config" else found.path
    line = f"{where}: {found.reason}" if where else f"{found.reason} (see {see})"
    if found.key and (near := nearest(found.key, found.choices)):
        line += f"; did you mean {near!r}?"
    elif found.key and found.listed and 0 < len(found.choices) <= 16:
        line += f" (it takes: {', '.join(found.choices)})"
    if found.path and (given := where_given(found.path, args)):
        line += f" ({given})"
    return line
