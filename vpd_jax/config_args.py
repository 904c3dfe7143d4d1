"""Parses the `key=value,...` argument of a config file's `get_config(arg)`.

Config files are small Python modules (big_vision style): `get_config(arg)` declares its arguments with
defaults, `parse_arg` converts the string the user typed into those types, and a key that the config
does not declare is an error that lists the keys it does. `parse_mesh` reads the mesh argument the
training configs share ("data:2+fsdp:-1").
"""

from typing import Any

import ml_collections


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config argument {key}={text!r}: expected a boolean (true/false)")
  for kind in (int, float):
    if isinstance(default, kind):
      try:
        return kind(text)
      except ValueError:
        raise ValueError(
            f"config argument {key}={text!r}: expected {kind.__name__}") from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Returns `defaults` updated from `arg` ("k1=v1,k2=v2"), typed like the defaults.

  Raises:
    ValueError: an item is not `key=value`, a key is unknown, or a value has the wrong type.
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"config argument {key!r} does not exist; known keys: {', '.join(sorted(defaults))}")
    values[key] = _convert(key, text, defaults[key])
  return ml_collections.ConfigDict(values)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (what `--config=path:arg` gives the commands)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  return module.get_config(arg)


def parse_mesh(text: str) -> list:
  """"data:2+fsdp:-1" -> [("data", 2), ("fsdp", -1)]."""
  axes = []
  for item in text.split("+"):
    name, sep, size = item.partition(":")
    try:
      axes.append((name.strip(), int(size)))
    except ValueError:
      sep = ""
    if not sep or not name.strip():
      raise ValueError(f"config argument mesh={text!r}: expected axis:size pairs joined by '+', "
                       "e.g. data:-1 or data:2+fsdp:-1")
  return axes
