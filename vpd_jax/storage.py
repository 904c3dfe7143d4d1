"""Files on Google Cloud Storage (gs:// paths), with errors that name the path.

Most of the library reaches gs:// paths without this module: TensorFlow's file system
(`tf.io.gfile`, tf.data's TFRecord reader, TensorBoard summaries) reads and writes trace records,
seqio data, metrics and reports there, and orbax writes checkpoints through tensorstore. This
module covers the rest, through `google-cloud-storage`:

  check_bucket(path)            fail early, naming the path, when the bucket is missing or this
                                account may not use it (`vpd-jax train` checks a gs:// workdir)
  upload_tree(dir, url)         copy a local directory (e.g. a trace directory) to GCS; the
                                manifest and statistics go last, so a reader that sees them sees
                                every shard
  download_tree(url, dir)       the reverse, each file written under a temporary name and renamed
  read_bytes, write_bytes, list_names

`tf.io.gfile` always talks to the real GCS endpoint, so when GCS is an emulator (tests, offline
work), traces move between the bucket and local disk with `upload_tree`/`download_tree`, while
orbax still checkpoints to the bucket directly. `emulator_environment(url)` gives the variables
that point google-cloud-storage, tensorstore and orbax's path layer (etils.epath, through gcsfs)
at an emulator; credentials are then anonymous.
"""

import contextlib
import os
from typing import Iterable, Iterator, Optional

from google.api_core import exceptions as api_exceptions
from google.auth import credentials as auth_credentials
from google.cloud import storage

SCHEME = "gs://"
EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
# Written last by `upload_tree`: their presence tells a reader that the directory is complete.
PUBLISH_LAST = ("manifest.json", "statistics.json")


def is_gcs(path: str) -> bool:
  return str(path).startswith(SCHEME)


def split(path: str) -> tuple[str, str]:
  """"gs://bucket/a/b" -> ("bucket", "a/b"); ValueError naming `path` when it is not one."""
  if not is_gcs(path):
    raise ValueError(f"{path!r} is not a gs://BUCKET/PATH path")
  bucket, _, name = str(path)[len(SCHEME):].partition("/")
  if not bucket:
    raise ValueError(f"{path!r} names no bucket; expected gs://BUCKET/PATH")
  return bucket, name


def emulator_environment(endpoint: str) -> dict:
  """Environment variables routing every GCS client of the library to the emulator at `endpoint`.

  google-cloud-storage reads STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays)
  TENSORSTORE_GCS_HTTP_URL, and EPATH_USE_TF=false sends orbax's directory operations through
  gcsfs, which honours STORAGE_EMULATOR_HOST, instead of TensorFlow, which does not.
  """
  if not endpoint.startswith(("http://", "https://")):
    raise ValueError(f"emulator endpoint {endpoint!r}: expected http://HOST:PORT")
  return {EMULATOR_VARIABLE: endpoint, "TENSORSTORE_GCS_HTTP_URL": endpoint,
          "EPATH_USE_TF": "false"}


def client() -> storage.Client:
  """A storage client: anonymous against an emulator, default credentials otherwise."""
  if os.environ.get(EMULATOR_VARIABLE):
    return storage.Client(project="emulator", credentials=auth_credentials.AnonymousCredentials())
  return storage.Client()


@contextlib.contextmanager
def named_errors(path: str) -> Iterator[None]:
  """Turns GCS's missing-bucket and permission errors into ones that name `path`."""
  try:
    yield
  except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as e:
    raise PermissionError(f"{path}: permission denied ({e.code} {e.message}); check that this "
                          "account may read and write the bucket") from None
  except api_exceptions.NotFound as e:
    bucket, _ = split(path)
    raise FileNotFoundError(f"{path}: not found; does the bucket gs://{bucket} exist? "
                            f"({e.message})") from None


def check_bucket(path: str) -> None:
  """FileNotFoundError / PermissionError naming `path` unless its bucket exists and is usable."""
  bucket, _ = split(path)
  with named_errors(path):
    # Listing needs storage.objects.list: a stronger check than the bucket's existence, and one
    # that a writer without bucket-metadata permission (a common role) still passes.
    list(client().list_blobs(bucket, max_results=1))


def list_names(url: str) -> list[str]:
  """Object names under the prefix `url` ("gs://b/dir"), relative to it, sorted."""
  bucket, prefix = split(url)
  prefix = prefix.rstrip("/") + "/" if prefix else ""
  with named_errors(url):
    return sorted(blob.name[len(prefix):] for blob in client().list_blobs(bucket, prefix=prefix))


def read_bytes(url: str) -> bytes:
  bucket, name = split(url)
  with named_errors(url):
    return client().bucket(bucket).blob(name).download_as_bytes()


def write_bytes(url: str, data: bytes) -> None:
  """Writes one object; GCS publishes an object whole, so readers never see part of it."""
  bucket, name = split(url)
  with named_errors(url):
    client().bucket(bucket).blob(name).upload_from_string(data)


def _publish_order(names: Iterable[str]) -> list[str]:
  return sorted(names, key=lambda n: (os.path.basename(n) in PUBLISH_LAST, n))


def upload_tree(local_dir: str, url: str) -> list[str]:
  """Copies every file under `local_dir` to `url`/...; returns the relative names copied."""
  if not os.path.isdir(local_dir):
    raise FileNotFoundError(f"directory {local_dir!r} does not exist")
  names = []
  for root, _, files in os.walk(local_dir):
    for file in files:
      names.append(os.path.relpath(os.path.join(root, file), local_dir).replace(os.sep, "/"))
  bucket_name, prefix = split(url)
  prefix = prefix.rstrip("/")
  with named_errors(url):
    bucket = client().bucket(bucket_name)
    for name in _publish_order(names):
      blob = bucket.blob(f"{prefix}/{name}" if prefix else name)
      blob.upload_from_filename(os.path.join(local_dir, name))
  return _publish_order(names)


def download_tree(url: str, local_dir: str, names: Optional[Iterable[str]] = None) -> list[str]:
  """Copies the objects under `url` (or only `names`) into `local_dir`; returns their names.

  Each file is written under a temporary name and renamed, so an interrupted copy leaves no
  half-written file. FileNotFoundError naming `url` when nothing is there.
  """
  bucket_name, prefix = split(url)
  prefix = prefix.rstrip("/")
  names = list_names(url) if names is None else list(names)
  if not names:
    raise FileNotFoundError(f"{url}: no objects under this prefix")
  with named_errors(url):
    bucket = client().bucket(bucket_name)
    for name in _publish_order(names):
      target = os.path.join(local_dir, *name.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      tmp = f"{target}.tmp-{os.getpid()}"
      bucket.blob(f"{prefix}/{name}" if prefix else name).download_to_filename(tmp)
      os.replace(tmp, target)
  return _publish_order(names)
