"""One file from a URL into the cache: once, resumable, atomic, hash-checked.

The file is written as ``<dest>.part`` and renamed to ``<dest>`` only after its
size and hash are checked, so a present ``<dest>`` is never a partial download.
An interrupted download resumes from the ``.part`` file (HTTP Range); a
complete download with the wrong hash is deleted and fetched again from
scratch. ``M6JAX_NO_DOWNLOAD=1`` forbids any network access (CI sets it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import pathlib
import time
import urllib.error
import urllib.request

import tqdm

log = logging.getLogger(__name__)

NO_DOWNLOAD_ENV = "M6JAX_NO_DOWNLOAD"
RETRY_WAIT_S = 1.0      # wait before retry n: RETRY_WAIT_S * n
CHUNK = 1 << 20


class NotAvailableError(FileNotFoundError):
  """The file is not in the cache and cannot be downloaded (offline, forbidden)."""


class HashMismatchError(ValueError):
  """The file's size or hash is not the expected one."""


def downloads_forbidden() -> bool:
  return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def hash_algorithm(file_hash: str) -> str:
  """Keras' rule (keras.utils.get_file, algorithm='auto'): 64 hex -> sha256, else md5."""
  return "sha256" if len(file_hash) == 64 else "md5"


def hash_file(path, algorithm: str = "sha256") -> str:
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      h.update(chunk)
  return h.hexdigest()


def check_file(path, file_hash: str | None, size: int | None = None) -> str | None:
  """None if `path` has the expected size and hash, else what is wrong."""
  got_size = os.path.getsize(path)
  if size is not None and got_size != size:
    return f"size {got_size} bytes, expected {size}"
  if file_hash:
    algo = hash_algorithm(file_hash)
    got = hash_file(path, algo)
    if got != file_hash.lower():
      return f"{algo} {got}, expected {file_hash}"
  return None


def describe(url: str, dest, file_hash: str | None, size: int | None = None,
             name: str = "NAME") -> str:
  """The lines every error about a missing or bad file ends with (name: what
  ``python -m m6jax.models.weights.sources fetch`` calls it)."""
  want = f"{hash_algorithm(file_hash)} {file_hash}" if file_hash else "(none published)"
  lines = [f"  file:          {pathlib.Path(dest).name}",
           f"  URL:           {url}",
           f"  expected hash: {want}"]
  if size is not None:
    lines.append(f"  expected size: {size} bytes")
  lines += [f"  manual copy:   download the URL on any machine and put the file at {dest}",
            f"  or prefetch:   python -m m6jax.models.weights.sources fetch {name}"
            " on a machine with internet,"
            f" then copy its cache folder to {pathlib.Path(dest).parent} ($M6JAX_CACHE)"]
  return "\n".join(lines)


def _hash_record(dest: pathlib.Path) -> pathlib.Path:
  return dest.with_name(dest.name + ".sha256")


def recorded_hash(dest) -> str | None:
  """The sha256 recorded at download for a file published without a hash."""
  rec = _hash_record(pathlib.Path(dest))
  if not rec.exists():
    return None
  return rec.read_text().strip() or None


def _record_hash(dest: pathlib.Path, digest: str) -> None:
  tmp = _hash_record(dest).with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(digest + "\n")
  os.replace(tmp, _hash_record(dest))


@contextlib.contextmanager
def _lock(dest: pathlib.Path):
  """Exclusive lock so concurrent processes do not write the same .part file."""
  with open(dest.with_name(dest.name + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def fetch(url: str, dest, file_hash: str | None = None, size: int | None = None,
          name: str = "NAME", attempts: int = 3, timeout: float = 60.0) -> pathlib.Path:
  """The verified file at `dest`, downloading `url` first if it is not there.

  No network access when `dest` is present and matches `file_hash` / `size`
  (a bad cached file is deleted and fetched again). Raises NotAvailableError
  when downloads are forbidden or every attempt failed, HashMismatchError when
  every attempt gave a wrong file; both messages name the file, URL, expected
  hash and where to put a manual copy.
  """
  dest = pathlib.Path(dest)
  info = describe(url, dest, file_hash, size, name)
  file_hash = file_hash or recorded_hash(dest)
  if dest.exists():
    problem = check_file(dest, file_hash, size)
    if problem is None:
      return dest
    log.warning("cached %s is bad (%s): deleting it", dest, problem)
    dest.unlink()
  if downloads_forbidden():
    raise NotAvailableError(f"weights file not in the cache and {NO_DOWNLOAD_ENV}=1 forbids "
                            f"downloads\n{info}")
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  with _lock(dest):
    if dest.exists():  # another process finished it while we waited
      return dest
    error: Exception | None = None
    for attempt in range(attempts):
      if attempt:
        time.sleep(RETRY_WAIT_S * attempt)
      try:
        _download(url, part, timeout)
      except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, truncation
        log.warning("download of %s failed (attempt %d/%d): %s", url, attempt + 1, attempts, e)
        error = e
        continue  # the .part file is kept: the next attempt resumes it
      problem = check_file(part, file_hash, size)
      if problem is None:
        if not file_hash:  # none published: record ours, later uses are checked against it
          _record_hash(dest, hash_file(part))
        os.replace(part, dest)
        return dest
      log.warning("downloaded %s is bad (%s): retrying from scratch", dest.name, problem)
      part.unlink()
      error = HashMismatchError(problem)
  if isinstance(error, HashMismatchError):
    raise HashMismatchError(f"downloaded weights have the wrong hash after {attempts} "
                            f"attempts ({error})\n{info}")
  raise NotAvailableError(f"weights file not in the cache and could not be downloaded "
                          f"({type(error).__name__}: {error})\n{info}")


def _download(url: str, part: pathlib.Path, timeout: float) -> None:
  """Appends the rest of `url` to `part` (HTTP Range), or rewrites it when the
  server does not resume. Raises OSError when fewer bytes than announced came."""
  have = part.stat().st_size if part.exists() else 0
  headers = {"User-Agent": "m6jax"}
  if have:
    headers["Range"] = f"bytes={have}-"
  try:
    resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416:  # the .part is not a prefix of the file: start again
      part.unlink()
    raise
  with resp:
    if have and resp.status != 206:
      have = 0  # the server sent the whole file
    length = resp.headers.get("Content-Length")
    total = have + int(length) if length is not None else None
    with open(part, "ab" if have else "wb") as f, tqdm.tqdm(
        total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5],
        disable=None, leave=False) as bar:
      while chunk := resp.read(CHUNK):
        f.write(chunk)
        bar.update(len(chunk))
  got = part.stat().st_size
  if total is not None and got < total:
    raise OSError(f"connection closed after {got} of {total} bytes")
