"""Tests for vpd_jax/storage.py and gs:// paths, against a GCS emulator started here.

The emulator (`gcp-storage-emulator`, the JSON API on localhost) holds an in-memory bucket; no
credentials are used. Trace records go to the bucket and come back intact, an orbax checkpoint is
saved into it and restored, and a missing bucket or a refused request gives an error naming the
path.
"""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from etils.epath import gpath
import pytest

from vpd_jax import storage
from vpd_jax.programs import pipeline
from vpd_jax.programs import records
from vpd_jax.train import checkpoint

BUCKET = "vpd-test"


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """The emulator's endpoint, with the bucket BUCKET created."""
  port = _free_port()
  process = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=localhost", f"--port={port}",
       "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("localhost", port), timeout=1).close()
      break
    except OSError:
      assert process.poll() is None, "the GCS emulator exited"
      assert time.time() < deadline, "the GCS emulator did not start"
      time.sleep(0.1)
  yield f"http://localhost:{port}"
  process.terminate()
  process.wait(timeout=30)


@pytest.fixture
def gcs(emulator, monkeypatch):
  for name, value in storage.emulator_environment(emulator).items():
    monkeypatch.setenv(name, value)
  # Nothing may reach for real credentials.
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
  # etils.epath decides once per process whether gs:// goes through TensorFlow (which cannot reach
  # the emulator); an earlier test in the same process may have fixed that choice.
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  yield emulator
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def test_paths():
  assert storage.split("gs://b/a/c.txt") == ("b", "a/c.txt")
  assert storage.split("gs://b") == ("b", "")
  with pytest.raises(ValueError, match="'/tmp/x' is not a gs://BUCKET/PATH path"):
    storage.split("/tmp/x")
  with pytest.raises(ValueError, match="names no bucket"):
    storage.split("gs:///x")
  with pytest.raises(ValueError, match="expected http://HOST:PORT"):
    storage.emulator_environment("localhost:9")


def test_traces_round_trip_through_a_bucket(gcs, trace_dir, tmp_path):
  url = f"gs://{BUCKET}/traces/train"
  uploaded = storage.upload_tree(trace_dir, url)
  shards = [n for n in uploaded if n.endswith(".tfrecord")]
  assert len(shards) == 4
  # The manifest and statistics are published after every shard.
  assert sorted(uploaded[-2:]) == [pipeline.MANIFEST_FILE, records.STATISTICS_FILE]
  assert storage.list_names(url) == sorted(uploaded)

  local = str(tmp_path / "train")
  assert sorted(storage.download_tree(url, local)) == sorted(uploaded)
  assert not [n for n in os.listdir(local) if ".tmp-" in n]
  original = [r.serialize() for r in records.read_records(trace_dir)]
  copied = [r.serialize() for r in records.read_records(local)]
  assert len(original) == 40 and copied == original
  manifest = json.loads(storage.read_bytes(f"{url}/{pipeline.MANIFEST_FILE}"))
  with open(os.path.join(trace_dir, pipeline.MANIFEST_FILE)) as f:
    assert manifest == json.load(f)

  storage.write_bytes(f"gs://{BUCKET}/notes/a.txt", b"hello")
  assert storage.read_bytes(f"gs://{BUCKET}/notes/a.txt") == b"hello"
  with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/nothing/here: no objects"):
    storage.download_tree(f"gs://{BUCKET}/nothing/here", str(tmp_path / "empty"))


def test_checkpoint_saved_to_and_restored_from_a_bucket(gcs):
  directory = f"gs://{BUCKET}/run/checkpoints"
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rows = 2 * jax.device_count()
  state = {"w": jax.device_put(np.arange(rows * 3, dtype=np.float32).reshape(rows, 3), sharding),
           "step": np.int32(7)}
  writer = checkpoint.Checkpointer(directory, model_size="tiny")
  assert writer.save(7, state, {"position": 7})
  writer.close()
  names = storage.list_names(directory)
  assert "7/_CHECKPOINT_METADATA" in names and any(n.startswith("7/state/") for n in names)

  reader = checkpoint.Checkpointer(directory, model_size="tiny")
  assert reader.latest_step() == 7
  restored, meta = reader.restore(state)
  reader.close()
  assert meta["data"] == {"position": 7} and meta["step"] == 7
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert restored["w"].sharding.is_equivalent_to(sharding, 2)
  assert int(restored["step"]) == 7


def test_missing_bucket_is_named(gcs, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"gs://no-such-bucket/run: not found; does the "
                                              r"bucket gs://no-such-bucket exist"):
    storage.check_bucket("gs://no-such-bucket/run")
  (tmp_path / "a.txt").write_text("a")
  with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/traces: not found"):
    storage.upload_tree(str(tmp_path), "gs://no-such-bucket/traces")
  storage.check_bucket(f"gs://{BUCKET}/run")  # the emulator's bucket passes


class _Refusing(http.server.BaseHTTPRequestHandler):
  """Answers every request as GCS does when the account lacks a permission."""

  def _refuse(self):
    body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                 "storage.objects.list access"}}).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = _refuse

  def log_message(self, *args):
    del args


def test_permission_error_is_named(monkeypatch):
  server = http.server.ThreadingHTTPServer(("localhost", 0), _Refusing)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    monkeypatch.setenv(storage.EMULATOR_VARIABLE, f"http://localhost:{server.server_port}")
    with pytest.raises(PermissionError, match=r"gs://locked/run: permission denied \(403 .*"
                                              r"caller does not have storage.objects.list"):
      storage.check_bucket("gs://locked/run")
    with pytest.raises(PermissionError, match="gs://locked/x.txt: permission denied"):
      storage.write_bytes("gs://locked/x.txt", b"x")
  finally:
    server.shutdown()
    server.server_close()


def test_training_into_a_missing_bucket_fails_early_naming_it(gcs):
  from vpd_jax.config_args import load_config_file  # pylint: disable=g-import-not-at-top
  from vpd_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                         "vpd_sft.py"), "size=tiny,total_steps=1")
  with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/run: not found"):
    loop.train(config, "gs://no-such-bucket/run")
