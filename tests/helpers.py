"""Test helpers: derive small configs from the shipped YAMLs."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def derived_config(source: str, tmp_path: Path, override: dict, name: str = "config.yaml") -> str:
    """Write `source` deep-merged with `override` to tmp_path/name; returns the path."""
    config = merge(yaml.safe_load(Path(source).read_text()), override)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def callback(config_path: str, class_name: str) -> dict:
    for cb in yaml.safe_load(Path(config_path).read_text())["trainer"]["callbacks"]:
        if cb["class_path"].endswith(class_name):
            return cb
    raise KeyError(class_name)
