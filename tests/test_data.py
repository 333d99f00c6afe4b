"""curvax.problems data loaders on small files written in the real formats, and errors."""

import gzip
import importlib.util
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import io as sio

import curvax.problems as problems
from curvax.problems import data


def write_idx(path, array):
  codes = {np.uint8: 0x08, np.int32: 0x0C}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def write_mnist_like(folder, n_train=60, n_test=20, gz=True, seed=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.RandomState(seed)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    x = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
    y = rng.randint(0, 10, n).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), x)
    write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), y)
    arrays[prefix] = (x, y)
  return arrays


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
  """Hide $CURVAX_DATA, ~/.curvax_data and the system location."""
  monkeypatch.delenv("CURVAX_DATA", raising=False)
  monkeypatch.setattr(data, "DEFAULT_ROOT", str(tmp_path / "default"))
  monkeypatch.setattr(data, "SYSTEM_ROOT", str(tmp_path / "system"))
  return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
  write_idx(path, x)
  np.testing.assert_array_equal(data.read_idx(path), x)
  y = np.array([-3, 7, 1 << 20], np.int32)
  write_idx(str(tmp_path / "b.idx"), y)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / "b.idx")), y)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(str(tmp_path / "bad"))


def test_truncated_or_corrupt_gzip_names_the_file(no_system_data):
  """An interrupted download: a ValueError naming the file and the remedy, not a bare EOFError."""
  folder = no_system_data / "mine" / "mnist"
  write_mnist_like(str(folder))
  path = folder / "train-images-idx3-ubyte.gz"
  whole = path.read_bytes()
  path.write_bytes(whole[:len(whole) // 2])
  with pytest.raises(ValueError, match="delete it and download it again") as info:
    data.load("mnist", str(no_system_data / "mine"))
  assert str(path) in str(info.value) and "truncated" in str(info.value)
  assert isinstance(info.value.__cause__, EOFError)
  path.write_bytes(b"not gzip at all")   # gzip.BadGzipFile, an OSError
  with pytest.raises(ValueError, match="delete it and download it again") as info:
    data.read_idx(str(path))
  assert str(path) in str(info.value)
  path.write_bytes(whole[:10] + b"\xff" * 40)   # a gzip header, then a broken deflate stream
  with pytest.raises(ValueError, match="delete it and download it again"):
    data.read_idx(str(path))
  with pytest.raises(FileNotFoundError):   # a missing file is not reported as corrupt
    data.read_idx(str(folder / "missing.gz"))


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_problem_reads_idx_files_from_data_dir(no_system_data, gz):
  folder = no_system_data / "mine"
  arrays = write_mnist_like(str(folder / "mnist"), gz=gz)
  p = problems.get("mnist_logreg", batch_size=8, data_dir=str(folder))
  x, y = p.data("train")
  xv, yv = p.data("valid")
  xt, yt = p.data("test")
  # valid holds out the last examples (a fifth of this small copy), train keeps the rest.
  assert (x.shape, xv.shape, xt.shape) == ((48, 28, 28, 1), (12, 28, 28, 1), (20, 28, 28, 1))
  np.testing.assert_array_equal(np.asarray(x)[..., 0], arrays["train"][0][:48])
  np.testing.assert_array_equal(np.asarray(yv), arrays["train"][1][48:])
  np.testing.assert_array_equal(np.asarray(yt), arrays["t10k"][1])
  np.testing.assert_array_equal(p.data("train_eval")[1], arrays["train"][1][:12])
  inputs, targets = next(p.batches("train", jax.random.PRNGKey(0)))
  assert inputs.shape == (8, 28, 28, 1) and inputs.dtype == jnp.float32
  assert 0.0 <= float(inputs.min()) and float(inputs.max()) <= 1.0
  assert targets.dtype == jnp.int32
  m = p.evaluate(p.init(jax.random.PRNGKey(0)))
  assert m["test_loss"] == pytest.approx(np.log(10), rel=1e-5)   # logreg inits at zero
  assert set(m) == {f"{s}_{k}" for s in ("train_eval", "valid", "test")
                    for k in ("loss", "accuracy")}


def test_search_order_data_dir_then_env_then_system(no_system_data, monkeypatch):
  env, system, mine = (no_system_data / d for d in ("env", "system", "mine"))
  write_mnist_like(str(system / "fashion-mnist"), seed=1)
  assert data.find("fashion-mnist") == str(system / "fashion-mnist")
  write_mnist_like(str(env / "fashion-mnist"), seed=2)
  monkeypatch.setenv("CURVAX_DATA", str(env))
  assert data.find("fashion-mnist") == str(env / "fashion-mnist")
  write_mnist_like(str(mine / "fashion-mnist"), seed=3)
  assert data.find("fashion-mnist", str(mine)) == str(mine / "fashion-mnist")


def test_mnist_files_in_data_dir_itself_are_no_fashion_mnist(no_system_data):
  """MNIST and Fashion-MNIST share file names: only data_dir/<name> identifies them."""
  mine, system = no_system_data / "mine", no_system_data / "system"
  write_mnist_like(str(mine), seed=3)   # an MNIST copy right in data_dir
  write_mnist_like(str(system / "fashion-mnist"), n_train=70, seed=1)
  assert data.find("fashion-mnist", str(mine)) == str(system / "fashion-mnist")
  p = problems.get("fmnist_logreg", data_dir=str(mine))
  assert p.num_examples("train") + p.num_examples("valid") == 70
  with pytest.raises(problems.DataNotFoundError) as info:
    data.find("mnist", str(mine))
  msg = str(info.value)
  assert f"  - {mine / 'mnist'}\n" in msg and f"  - {mine}\n" not in msg
  assert f"{mine} itself holds files of these names" in msg
  assert f"move them to {mine / 'mnist'}" in msg
  write_mnist_like(str(mine / "mnist"), seed=4)
  assert data.find("mnist", str(mine)) == str(mine / "mnist")
  # Data sets with file names of their own are still found in data_dir itself.
  flat = no_system_data / "flat"
  flat.mkdir()
  for f in ("cifar-10-python.tar.gz", "train_32x32.mat", "test_32x32.mat"):
    (flat / f).write_bytes(b"")
  assert data.find("cifar-10", str(flat)) == data.find("svhn", str(flat)) == str(flat)


def test_missing_data_names_every_place_searched(no_system_data, monkeypatch):
  monkeypatch.setenv("CURVAX_DATA", str(no_system_data / "env"))
  p = problems.get("cifar100_allcnnc", data_dir=str(no_system_data / "mine"))
  jax.eval_shape(p.init, jax.random.PRNGKey(0))  # fine without data
  with pytest.raises(problems.DataNotFoundError) as info:
    p.data("train")
  msg = str(info.value)
  for place in (no_system_data / "mine" / "cifar-100", no_system_data / "mine",
                no_system_data / "env" / "cifar-100", no_system_data / "default" / "cifar-100",
                no_system_data / "system" / "cifar-100"):
    assert str(place) in msg
  assert "cifar-100-python.tar.gz" in msg and "download('cifar-100')" in msg
  assert f"downloads into {no_system_data / 'env' / 'cifar-100'}" in msg
  assert isinstance(info.value, FileNotFoundError)


def _cifar_pickles(rng, n, num_classes):
  x = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
  y = rng.randint(0, num_classes, n)
  key = b"labels" if num_classes == 10 else b"fine_labels"
  return {b"data": x, key: list(y)}, x.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), y


@pytest.mark.parametrize("layout", ["folder", "tar", "binary"])
def test_cifar10_formats(no_system_data, layout):
  rng = np.random.RandomState(0)
  root = no_system_data / "mine" / "cifar-10"
  os.makedirs(root)
  batches = {f"data_batch_{i}": _cifar_pickles(rng, 10, 10) for i in range(1, 6)}
  batches["test_batch"] = _cifar_pickles(rng, 7, 10)
  if layout == "binary":
    os.makedirs(root / "cifar-10-batches-bin")
    for name, (_, x, y) in batches.items():
      rec = np.concatenate([np.asarray(y, np.uint8)[:, None],
                            x.transpose(0, 3, 1, 2).reshape(len(y), -1)], axis=1)
      (root / "cifar-10-batches-bin" / f"{name}.bin").write_bytes(rec.tobytes())
  else:
    os.makedirs(root / "cifar-10-batches-py")
    for name, (d, _, _) in batches.items():
      with open(root / "cifar-10-batches-py" / name, "wb") as f:
        pickle.dump(d, f)
    if layout == "tar":
      with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
      for f in os.listdir(root / "cifar-10-batches-py"):
        os.remove(root / "cifar-10-batches-py" / f)
      os.rmdir(root / "cifar-10-batches-py")
  out = data.load("cifar-10", str(no_system_data / "mine"))
  x_train = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
  np.testing.assert_array_equal(out["train"][0], x_train)
  np.testing.assert_array_equal(out["test"][1], batches["test_batch"][2])
  assert out["train"][0].shape == (50, 32, 32, 3)


def test_cifar100_problem_fine_labels_and_preprocessing(no_system_data):
  rng = np.random.RandomState(1)
  root = no_system_data / "mine" / "cifar-100" / "cifar-100-python"
  os.makedirs(root)
  train, test = _cifar_pickles(rng, 40, 100), _cifar_pickles(rng, 6, 100)
  for name, (d, _, _) in (("train", train), ("test", test)):
    d[b"coarse_labels"] = [0] * len(d[b"fine_labels"])
    with open(root / name, "wb") as f:
      pickle.dump(d, f)
  p = problems.get("cifar100_3c3d", batch_size=4, data_dir=str(no_system_data / "mine"))
  np.testing.assert_array_equal(p.data("test")[1], test[2])
  for split in ("train", "test"):
    inputs, _ = next(p.batches(split, jax.random.PRNGKey(0)))
    # per-image standardisation (augmented or not)
    np.testing.assert_allclose(np.asarray(inputs).mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(inputs).std(axis=(1, 2, 3)), 1.0, atol=1e-3)
  raw = np.asarray(p.data("test")[0][:4], np.float32) / 255
  inputs, _ = next(p.batches("test"))
  expected = (raw - raw.mean(axis=(1, 2, 3), keepdims=True)) / raw.std(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(inputs, expected, atol=1e-4)   # eval: no augmentation


def test_svhn_mat_files(no_system_data):
  rng = np.random.RandomState(2)
  root = no_system_data / "mine" / "svhn"
  os.makedirs(root)
  expected = {}
  for split, n in (("train", 15), ("test", 5)):
    x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
    y = rng.randint(1, 11, (n, 1)).astype(np.uint8)   # 10 means digit 0
    y[:3, 0] = (10, 1, 10)   # certainly some 10s (and a 1, which stays)
    sio.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
    expected[split] = (x.transpose(3, 0, 1, 2), y[:, 0])   # raw labels 1..10
  out = data.load("svhn", str(no_system_data / "mine"))
  for split in ("train", "test"):
    raw = expected[split][1]
    np.testing.assert_array_equal(out[split][0], expected[split][0])
    np.testing.assert_array_equal(out[split][1][:3], [0, 1, 0])
    np.testing.assert_array_equal(out[split][1], raw % 10)   # 10 -> 0, 1..9 unchanged
    assert out[split][1].dtype == np.int32 and 10 not in out[split][1]
    assert (out[split][1] == 0).sum() == (raw == 10).sum() >= 2


def test_download_verifies_checksums(no_system_data, monkeypatch):
  """download() with a fake urlopen: good files are kept, a bad checksum raises."""
  payload = b"hello"
  import hashlib
  good = hashlib.md5(payload).hexdigest()
  monkeypatch.setitem(data.DATASETS, "toy", dict(
      files=(("a.bin",),), urls=[("http://example.invalid/a.bin", good)], hint=""))

  class Response:
    def __init__(self, body):
      self.body = [body, b""]
    def read(self, n):
      return self.body.pop(0)
    def __enter__(self):
      return self
    def __exit__(self, *a):
      return False

  monkeypatch.setattr(data.urllib.request, "urlopen", lambda url: Response(payload))
  folder = data.download("toy", str(no_system_data / "dl"))
  assert (no_system_data / "dl" / "toy" / "a.bin").read_bytes() == payload
  assert data.find("toy", str(no_system_data / "dl")) == folder
  monkeypatch.setattr(data.urllib.request, "urlopen", lambda url: Response(b"tampered"))
  os.remove(os.path.join(folder, "a.bin"))
  with pytest.raises(IOError, match="checksum mismatch"):
    data.download("toy", str(no_system_data / "dl"))
  assert not os.path.exists(os.path.join(folder, "a.bin"))


def test_download_without_data_dir_is_found(tmp_path, monkeypatch):
  """Neither data_dir nor $CURVAX_DATA: download() fills ~/.curvax_data/<name>, which
  find() and problems.get search; with $CURVAX_DATA set, $CURVAX_DATA/<name>."""
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.delenv("CURVAX_DATA", raising=False)
  monkeypatch.setattr(data, "SYSTEM_ROOT", str(tmp_path / "system"))
  src = tmp_path / "src"
  arrays = write_mnist_like(str(src))
  urls = [((src / f).as_uri(), data._md5(str(src / f))) for f in sorted(os.listdir(src))]
  monkeypatch.setitem(data.DATASETS, "mnist", dict(data.DATASETS["mnist"], urls=urls))
  expected = home / ".curvax_data" / "mnist"
  with pytest.raises(problems.DataNotFoundError) as info:
    data.find("mnist")
  assert f"downloads into {expected}" in str(info.value) and str(expected) in str(info.value)
  assert data.download("mnist_logreg") == str(expected)   # a problem name works too
  assert sorted(os.listdir(expected)) == sorted(os.listdir(src))
  assert data.find("mnist") == str(expected)
  np.testing.assert_array_equal(problems.get("mnist_logreg").data("test")[1], arrays["t10k"][1])
  env = tmp_path / "env"
  monkeypatch.setenv("CURVAX_DATA", str(env))
  assert data.download("mnist") == str(env / "mnist")
  assert data.find("mnist") == str(env / "mnist")   # $CURVAX_DATA comes first


def test_real_fashion_mnist_files():
  # Debian's dataset-fashion-mnist (installed by .ci/run) at /usr/share/datasets.
  out = data.load("fashion-mnist")
  assert out["train"][0].shape == (60000, 28, 28, 1) and out["test"][0].shape == (10000, 28, 28, 1)
  assert np.bincount(out["test"][1]).tolist() == [1000] * 10


# ------------------------------------------------- independent references (round 18)

def _idx_by_hand(path):
  """An independent IDX reader: struct header + np.frombuffer (big-endian), native result."""
  import struct  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as fh:
    raw = fh.read()
  if path.endswith(".gz"):
    raw = gzip.decompress(raw)
  zero, code, ndim = struct.unpack(">HBB", raw[:4])
  assert zero == 0
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
  a = np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=4 + 4 * ndim)
  return a.reshape(shape).astype(np.dtype(dtype).newbyteorder("="))


def test_real_fashion_mnist_matches_an_independent_idx_reader_and_problem_splits(monkeypatch):
  """Debian's dataset-fashion-mnist read with struct/np.frombuffer: `data.load` agrees
  bit for bit, and fmnist_* splits have DeepOBS 1.2's sizes (valid = the last 10,000
  training images, where DeepOBS's TensorFlow loader takes the first; train_eval = the
  first 10,000 of the rest; test = t10k), scaled by 1/255."""
  folder = "/usr/share/datasets/fashion-mnist"
  if not os.path.isdir(folder):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  out = data.load("fashion-mnist")
  # The large training images are compared by shape only (same code path as t10k's).
  assert out["train"][0].shape == (60_000, 28, 28, 1) and out["train"][0].dtype == np.uint8
  x = _idx_by_hand(os.path.join(folder, "t10k-images-idx3-ubyte.gz"))
  np.testing.assert_array_equal(out["test"][0][..., 0], x)
  for split, prefix in (("train", "train"), ("test", "t10k")):
    y = _idx_by_hand(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(out[split][1], y.astype(np.int32))
    assert out[split][1].dtype == np.int32
  ytr = out["train"][1]
  monkeypatch.setattr(problems.data, "load", lambda name, data_dir=None: out)
  p = problems.get("fmnist_logreg", batch_size=1000)
  sizes = {s: p.num_examples(s) for s in ("train", "train_eval", "valid", "test")}
  assert sizes == {"train": 50_000, "train_eval": 10_000, "valid": 10_000, "test": 10_000}
  np.testing.assert_array_equal(p.data("valid")[1], ytr[50_000:])
  np.testing.assert_array_equal(p.data("train_eval")[1], ytr[:10_000])
  inputs, targets = next(p.batches("test"))
  np.testing.assert_array_equal(targets, y[:1000])
  np.testing.assert_allclose(np.asarray(inputs)[..., 0], x[:1000] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("dtype,code", [(">i1", 0x09), (">i2", 0x0B), (">i4", 0x0C),
                                        (">f4", 0x0D), (">f8", 0x0E)])
def test_idx_other_type_codes_are_big_endian_and_returned_native(tmp_path, dtype, code):
  """The IDX type codes 0x09..0x0E hold big-endian data; `read_idx` returns the values
  in native byte order (a header built with struct, not with the reader's table)."""
  import struct  # pylint: disable=import-outside-toplevel
  values = np.array([[-3.5, 2.0, 1000.25], [7.0, -1.0, 0.0]])
  if dtype[1] == "i":
    values = np.array([[-3, 2, 100], [7, -1, 0]])
  payload = struct.pack(">HBB2I", 0, code, 2, 2, 3) + values.astype(dtype).tobytes()
  path = tmp_path / "x.idx"
  path.write_bytes(payload)
  got = data.read_idx(str(path))
  np.testing.assert_array_equal(got, values)
  assert got.shape == (2, 3) and got.dtype.isnative
  assert got.dtype.kind == np.dtype(dtype).kind and got.dtype.itemsize == np.dtype(dtype).itemsize


def test_truncated_raw_idx_and_mismatched_counts_are_value_errors(no_system_data):
  folder = no_system_data / "mine" / "mnist"
  write_mnist_like(str(folder), gz=False)
  path = folder / "t10k-images-idx3-ubyte"
  whole = path.read_bytes()
  path.write_bytes(whole[:-1])   # one byte short of the 20 x 28 x 28 the header announces
  with pytest.raises(ValueError, match="truncated") as info:
    data.read_idx(str(path))
  assert str(path) in str(info.value) and "(20, 28, 28)" in str(info.value)
  path.write_bytes(whole)
  # 20 test images but 19 labels: refused, naming the folder and the split.
  labels = folder / "t10k-labels-idx1-ubyte"
  write_idx(str(labels), np.zeros(19, np.uint8))
  with pytest.raises(ValueError, match="20 test images but 19 labels") as info:
    data.load("mnist", str(no_system_data / "mine"))
  assert str(folder) in str(info.value)


def test_incomplete_folder_is_not_a_copy(no_system_data):
  """A folder with some of the required files is skipped; the next complete one wins."""
  mine, system = no_system_data / "mine", no_system_data / "system"
  write_mnist_like(str(mine / "mnist"))
  os.remove(mine / "mnist" / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(problems.DataNotFoundError):
    data.find("mnist", str(mine))
  write_mnist_like(str(system / "mnist"))
  assert data.find("mnist", str(mine)) == str(system / "mnist")


def test_download_replaces_a_corrupt_existing_file_and_leaves_no_partial(
    no_system_data, monkeypatch):
  import hashlib  # pylint: disable=import-outside-toplevel
  payload = b"the real bytes"
  monkeypatch.setitem(data.DATASETS, "toy", dict(
      files=(("a.bin",),), urls=[("http://example.invalid/a.bin",
                                  hashlib.md5(payload).hexdigest())], hint=""))
  fetched = []

  class Response:
    def __init__(self, body):
      self.body = [body, b""]
    def read(self, n):
      del n
      return self.body.pop(0)
    def __enter__(self):
      return self
    def __exit__(self, *a):
      return False

  def urlopen(url, body=payload):
    fetched.append(url)
    return Response(body)

  monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
  folder = no_system_data / "dl" / "toy"
  folder.mkdir(parents=True)
  (folder / "a.bin").write_bytes(b"half a downl")   # an old, bad copy
  assert data.download("toy", str(no_system_data / "dl")) == str(folder)
  assert (folder / "a.bin").read_bytes() == payload and len(fetched) == 1
  data.download("toy", str(no_system_data / "dl"))   # a good copy is kept, not fetched
  assert len(fetched) == 1
  os.remove(folder / "a.bin")
  monkeypatch.setattr(data.urllib.request, "urlopen", lambda url: Response(b"tampered"))
  with pytest.raises(IOError, match="checksum mismatch"):
    data.download("toy", str(no_system_data / "dl"))
  assert os.listdir(folder) == []   # neither a.bin nor a.bin.part stays behind


def test_download_root_prefers_data_dir_then_env_then_default(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("CURVAX_DATA", str(tmp_path / "env"))
  assert data.download_root(str(tmp_path / "mine")) == str(tmp_path / "mine")
  assert data.download_root() == str(tmp_path / "env")
  monkeypatch.delenv("CURVAX_DATA")
  assert data.download_root() == str(tmp_path / "home" / ".curvax_data")


def test_cifar100_binary_uses_fine_labels(no_system_data):
  """cifar-100-binary records are <coarse label><fine label><3072 bytes>: the fine one counts."""
  rng = np.random.RandomState(3)
  root = no_system_data / "mine" / "cifar-100" / "cifar-100-binary"
  os.makedirs(root)
  expected = {}
  for name, n in (("train", 9), ("test", 4)):
    x = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    coarse = rng.randint(0, 20, n).astype(np.uint8)
    fine = (coarse.astype(np.int64) * 5 + 1 + rng.randint(0, 4, n)).astype(np.uint8)
    rec = np.concatenate([coarse[:, None], fine[:, None],
                          x.transpose(0, 3, 1, 2).reshape(n, -1)], axis=1)
    (root / f"{name}.bin").write_bytes(rec.tobytes())
    expected[name] = (x, fine.astype(np.int32))
  out = data.load("cifar-100", str(no_system_data / "mine"))
  for split in ("train", "test"):
    np.testing.assert_array_equal(out[split][0], expected[split][0])
    np.testing.assert_array_equal(out[split][1], expected[split][1])


def test_unknown_idx_type_code_is_not_an_idx_file(tmp_path):
  import struct  # pylint: disable=import-outside-toplevel
  for code in (0x07, 0x0A, 0x0F):   # not ubyte/byte/short/int/float/double
    path = tmp_path / f"code{code}.idx"
    path.write_bytes(struct.pack(">HBBI", 0, code, 1, 2) + b"\x00" * 16)
    with pytest.raises(ValueError, match="not an IDX file"):
      data.read_idx(str(path))


def test_svhn_hint_names_scipy_only_when_scipy_is_missing(tmp_path, monkeypatch):
  with pytest.raises(data.DataNotFoundError) as found:
    data.find("svhn", str(tmp_path))
  assert "pip install scipy" not in str(found.value)   # installed here (tests read .mat)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "scipy" else real(name, *a))
  with pytest.raises(data.DataNotFoundError, match="needs scipy"):
    data.find("svhn", str(tmp_path))
