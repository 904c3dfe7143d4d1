"""Tests for vpd_jax.config_args and the config files."""

import importlib.util
import os

import pytest

from vpd_jax.config_args import parse_arg
from vpd_jax.config_args import parse_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types_and_defaults():
  c = parse_arg("n=3,lr=0.5,name=x,flag=true", n=1, lr=1.0, name="a", flag=False, other=7)
  assert (c.n, c.lr, c.name, c.flag, c.other) == (3, 0.5, "x", True, 7)
  assert parse_arg(None, n=1).n == 1


@pytest.mark.parametrize("arg, message", [
    ("bogus=1", "config argument 'bogus' does not exist; known keys: n"),
    ("n=abc", "expected int"),
    ("n", "expected key=value"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    parse_arg(arg, n=1)


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_traces_config():
  config = _load("traces_shapes").get_config("num_examples=10,k=3,beam_workers=2")
  assert config.input.source == "shapes" and config.input.num_examples == 10
  assert config.generator.k == 3 and config.generator.name == "grammar"
  assert config.beam.direct_running_mode == "multi_processing"
  jsonl = _load("traces_shapes").get_config("input=/data/x.jsonl")
  assert jsonl.input.source == "jsonl" and jsonl.input.path == "/data/x.jsonl"
  with pytest.raises(ValueError, match="'num_exmaples' does not exist"):
    _load("traces_shapes").get_config("num_exmaples=10")


def test_load_config_file_and_its_errors(tmp_path):
  from vpd_jax.config_args import load_config_file  # pylint: disable=g-import-not-at-top
  config = load_config_file(os.path.join(ROOT, "configs", "traces_shapes.py"), "k=2")
  assert config.generator.k == 2
  with pytest.raises(FileNotFoundError, match="config file .*nope.py.* does not exist"):
    load_config_file(str(tmp_path / "nope.py"))
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    load_config_file(str(tmp_path / "empty.py"))


def test_parse_mesh():
  assert parse_mesh("data:2+fsdp:-1") == [("data", 2), ("fsdp", -1)]
  assert parse_mesh("data:-1") == [("data", -1)]
  for bad in ("data", "data:two", ":4", "data:2+"):
    with pytest.raises(ValueError, match=r"config argument mesh=.*axis:size pairs"):
      parse_mesh(bad)
