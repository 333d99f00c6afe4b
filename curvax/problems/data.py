"""Data sets of the DeepOBS problems: finding, reading and downloading the files.

Readers for the standard distribution formats, all returning NumPy arrays
(images as ``uint8`` in NHWC layout, labels as ``int32``):

* IDX (MNIST, Fashion-MNIST), gzip-compressed or raw: `read_idx`;
* CIFAR-10/100 python pickles (as shipped in ``cifar-*-python.tar.gz``, read
  straight from the archive or from its extracted folder) and the binary
  version (``cifar-*-binary``): `read_cifar`;
* SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5, read with
  ``scipy.io.loadmat``; SVHN's label 10 means digit 0): `read_svhn`.

Files are looked up, in this order, in ``data_dir/<name>`` (``data_dir`` is the
argument of `curvax.problems.get`; `download` puts files there) and, for data
sets whose file names are their own (CIFAR, SVHN), in ``data_dir`` itself; in
``$CURVAX_DATA/<name>``, in ``~/.curvax_data/<name>`` (where `download` puts
files when neither ``data_dir`` nor ``$CURVAX_DATA`` is given), and in the
system location ``/usr/share/datasets/<name>`` (where Debian's
``dataset-fashion-mnist`` package installs Fashion-MNIST). MNIST and
Fashion-MNIST share their file names, so a folder of such files is taken for
the data set it is named after only: ``data_dir`` itself is not searched for
them (a ``data_dir`` holding MNIST would otherwise be read as Fashion-MNIST). A
missing data set raises `DataNotFoundError`, which names every place searched
and how to get the files; `download` fetches them (with checksum verification)
for users with internet access.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import tarfile
import urllib.request
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SYSTEM_ROOT = "/usr/share/datasets"
ENV_VAR = "CURVAX_DATA"
# Where `download` puts data sets when neither data_dir nor $CURVAX_DATA is
# given (``~`` is expanded when used); also searched by `find`.
DEFAULT_ROOT = "~/.curvax_data"

Split = Tuple[np.ndarray, np.ndarray]

# name -> (files a complete copy needs (any one of each tuple), [(url, md5)]).
_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"),
    ("train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"),
    ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"),
)

DATASETS: Dict[str, dict] = {
    "fashion-mnist": dict(
        files=_MNIST_FILES,
        urls=[
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
             "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
             "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
             "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
             "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ],
        hint="On Debian/Ubuntu: `apt-get install dataset-fashion-mnist`."),
    "mnist": dict(
        files=_MNIST_FILES,
        urls=[
            ("https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
             "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz",
             "d53e105ee54ea40749a09fcbcd1e9432"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
             "9fb629c4189551a2d022fa330f9573f3"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
             "ec29112dd5afa0611ce80d1b7f02629c"),
        ],
        hint=""),
    "cifar-10": dict(
        files=(("cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar-10-batches-bin"),),
        urls=[("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
               "c58f30108f718f92721af3b95e74349a")],
        hint=""),
    "cifar-100": dict(
        files=(("cifar-100-python.tar.gz", "cifar-100-python", "cifar-100-binary"),),
        urls=[("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
               "eb9058c3a382ffc7106e4002c42a8d85")],
        hint=""),
    "svhn": dict(
        files=(("train_32x32.mat",), ("test_32x32.mat",)),
        urls=[("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
               "e26dedcc434d2e4c54c9b2d4a06d8373"),
              ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
               "eb5a983be6a315427106f1b164d9cef3")],
        hint="SVHN's reader needs scipy (`pip install scipy`).", needs="scipy"),
}


def _importable(module: Optional[str]) -> bool:
  """Whether ``module`` imports (False for None: a hint with no condition)."""
  if module is None:
    return False
  return importlib.util.find_spec(module) is not None


class DataNotFoundError(FileNotFoundError):
  """A data set's files are in none of the places searched."""


def download_root(data_dir: Optional[str] = None) -> str:
  """The folder `download` puts data sets in (each in a ``<name>`` subfolder).

  ``data_dir`` if given, else ``$CURVAX_DATA`` if set, else ``~/.curvax_data``
  (`DEFAULT_ROOT`, expanded).
  """
  return data_dir or os.environ.get(ENV_VAR) or os.path.expanduser(DEFAULT_ROOT)


def _shares_file_names(name: str) -> bool:
  """Whether another data set has files of the same names (MNIST and Fashion-MNIST)."""
  mine = {f for alts in DATASETS[name]["files"] for f in alts}
  return any(mine & {f for alts in spec["files"] for f in alts}
             for other, spec in DATASETS.items() if other != name)


def search_paths(name: str, data_dir: Optional[str] = None) -> List[str]:
  """The folders searched for data set ``name``, in order.

  ``data_dir/<name>`` (if given) and ``data_dir`` itself unless ``name``'s
  files have the names of another data set's (MNIST and Fashion-MNIST: only the
  folder's name tells them apart), ``$CURVAX_DATA/<name>`` (if set),
  ``~/.curvax_data/<name>`` (`download`'s default) and
  ``/usr/share/datasets/<name>``.
  """
  paths = []
  if data_dir is not None:
    paths.append(os.path.join(data_dir, name))
    if not _shares_file_names(name):
      paths.append(data_dir)
  env = os.environ.get(ENV_VAR)
  if env:
    paths.append(os.path.join(env, name))
  default = os.path.join(os.path.expanduser(DEFAULT_ROOT), name)
  if default not in paths:
    paths.append(default)
  paths.append(os.path.join(SYSTEM_ROOT, name))
  return paths


def _complete(folder: str, files: Sequence[Tuple[str, ...]]) -> bool:
  return all(any(os.path.exists(os.path.join(folder, f)) for f in alts) for alts in files)


def find(name: str, data_dir: Optional[str] = None) -> str:
  """Returns the first searched folder holding a complete copy of data set ``name``.

  Raises:
    DataNotFoundError: naming every folder searched and how to get the files.
  """
  spec = DATASETS[name]
  paths = search_paths(name, data_dir)
  for folder in paths:
    if os.path.isdir(folder) and _complete(folder, spec["files"]):
      return folder
  wanted = ", ".join(" or ".join(alts) for alts in spec["files"])
  where = "\n".join(f"  - {p}" for p in paths)
  hint = f"\n{spec['hint']}" if spec["hint"] and not _importable(spec.get("needs")) else ""
  if (data_dir is not None and data_dir not in paths and os.path.isdir(data_dir)
      and _complete(data_dir, spec["files"])):
    hint += (f"\n{data_dir} itself holds files of these names but is not searched for "
             f"'{name}': other data sets have the same file names, so only a folder named "
             f"'{name}' identifies them. If they are '{name}', move them to "
             f"{os.path.join(data_dir, name)}.")
  raise DataNotFoundError(
      f"Data set '{name}' not found. Looked for {wanted} in:\n{where}\n"
      f"To get it: run `python -c \"import curvax.problems as p; p.download('{name}')\"` "
      f"(downloads into {os.path.join(download_root(), name)}: ${ENV_VAR}/{name} if "
      f"${ENV_VAR} is set, else {DEFAULT_ROOT}/{name}; or pass data_dir=...), or put "
      f"the files in one of the folders above, or set ${ENV_VAR} to a folder holding "
      f"'{name}/'.{hint}")


def _first(folder: str, alts: Sequence[str]) -> str:
  for f in alts:
    path = os.path.join(folder, f)
    if os.path.exists(path):
      return path
  raise DataNotFoundError(f"none of {list(alts)} in {folder}")


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (LeCun's MNIST format), gzip-compressed or raw.

  Header: two zero bytes, a type code (0x08 = ubyte, ...), the number of
  dimensions ``d``, then ``d`` big-endian int32 sizes; the data follows in C order.

  Raises:
    ValueError: naming ``path``, if the file is not IDX, is truncated, or (for
      ``.gz``) is not a complete gzip stream (e.g. an interrupted download).
  """
  with open(path, "rb") as fh:
    if path.endswith(".gz"):
      try:
        with gzip.GzipFile(fileobj=fh) as f:
          raw = f.read()
      except (EOFError, OSError, zlib.error) as e:
        raise ValueError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and "
            f"download it again (curvax.problems.download).") from e
    else:
      raw = fh.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r}).")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  offset = 4 + 4 * ndim
  count = int(np.prod(shape)) if shape else 1
  if len(raw) - offset < count * dtype.itemsize:
    raise ValueError(f"{path} is truncated: header says {shape}; delete it and "
                     f"download it again (curvax.problems.download).")
  data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
  return data.reshape(shape).astype(dtype.newbyteorder("="))


def read_mnist_like(folder: str) -> Dict[str, Split]:
  """Reads MNIST/Fashion-MNIST IDX files: {'train': (x, y), 'test': (x, y)}, x (N, 28, 28, 1)."""
  out = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    x = read_idx(_first(folder, (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte")))
    y = read_idx(_first(folder, (f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte")))
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"{folder}: {x.shape[0]} {split} images but {y.shape[0]} labels.")
    out[split] = (x.reshape(x.shape[0], x.shape[1], x.shape[2], 1).astype(np.uint8),
                  y.astype(np.int32))
  return out


# --------------------------------------------------------------------------- CIFAR

def _cifar_pickle_to_arrays(d: dict, label_key: bytes) -> Split:
  x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  y = np.asarray(d[label_key], np.int32)
  return np.ascontiguousarray(x), y


def _cifar_binary(raw: bytes, label_bytes: int) -> Split:
  rec = np.frombuffer(raw, np.uint8).reshape(-1, label_bytes + 3072)
  y = rec[:, label_bytes - 1].astype(np.int32)  # CIFAR-100: (coarse, fine) -> fine.
  x = rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(x), y


def read_cifar(folder: str, num_classes: int) -> Dict[str, Split]:
  """Reads CIFAR-10/100 from the python archive/folder or the binary folder.

  Images (N, 32, 32, 3) uint8; CIFAR-100 uses the 100 fine labels.
  """
  if num_classes == 10:
    archive, pyfolder, binfolder = "cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar-10-batches-bin"
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    label_key, label_bytes = b"labels", 1
  else:
    archive, pyfolder, binfolder = "cifar-100-python.tar.gz", "cifar-100-python", "cifar-100-binary"
    names = {"train": ["train"], "test": ["test"]}
    label_key, label_bytes = b"fine_labels", 2

  def concat(parts):
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

  if os.path.isdir(os.path.join(folder, pyfolder)):
    out = {}
    for split, files in names.items():
      parts = []
      for f in files:
        with open(os.path.join(folder, pyfolder, f), "rb") as fh:
          parts.append(_cifar_pickle_to_arrays(pickle.load(fh, encoding="bytes"), label_key))
      out[split] = concat(parts)
    return out
  if os.path.isdir(os.path.join(folder, binfolder)):
    out = {}
    for split, files in names.items():
      parts = []
      for f in files:
        with open(os.path.join(folder, binfolder, f + ".bin"), "rb") as fh:
          parts.append(_cifar_binary(fh.read(), label_bytes))
      out[split] = concat(parts)
    return out
  with tarfile.open(os.path.join(folder, archive), "r:gz") as tar:
    out = {}
    for split, files in names.items():
      parts = []
      for f in files:
        member = tar.extractfile(f"{pyfolder}/{f}")
        parts.append(_cifar_pickle_to_arrays(pickle.load(member, encoding="bytes"), label_key))
      out[split] = concat(parts)
    return out


# ---------------------------------------------------------------------------- SVHN

def read_svhn(folder: str) -> Dict[str, Split]:
  """Reads SVHN's cropped-digit .mat files (needs scipy): images (N, 32, 32, 3) uint8."""
  try:
    from scipy import io as sio  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover
    raise ImportError("Reading SVHN's .mat files needs scipy: `pip install scipy`.") from e
  out = {}
  for split in ("train", "test"):
    mat = sio.loadmat(os.path.join(folder, f"{split}_32x32.mat"))
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2))).astype(np.uint8)
    y = np.asarray(mat["y"]).reshape(-1).astype(np.int32)
    out[split] = (x, np.where(y == 10, 0, y).astype(np.int32))
  return out


def load(name: str, data_dir: Optional[str] = None) -> Dict[str, Split]:
  """Finds and reads data set ``name``: {'train': (x, y), 'test': (x, y)} of NumPy arrays."""
  folder = find(name, data_dir)
  if name in ("mnist", "fashion-mnist"):
    return read_mnist_like(folder)
  if name == "cifar-10":
    return read_cifar(folder, 10)
  if name == "cifar-100":
    return read_cifar(folder, 100)
  if name == "svhn":
    return read_svhn(folder)
  raise KeyError(name)


# ------------------------------------------------------------------------ download

def _md5(path: str) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def download(name: str, data_dir: Optional[str] = None) -> str:
  """Downloads data set ``name`` and verifies each file's MD5 checksum.

  Files go to ``data_dir/<name>`` (default ``$CURVAX_DATA/<name>``, else
  ``~/.curvax_data/<name>``, see `download_root`), all of which `find`
  searches; files already there with the right checksum are kept. ``name`` is a
  data set ('fashion-mnist', 'mnist', 'cifar-10', 'cifar-100', 'svhn') or a
  problem name ('fmnist_mlp', ...). Returns the folder.

  Raises:
    IOError: if a downloaded file's checksum does not match (the file is removed).
  """
  name = DATASET_OF_PROBLEM.get(name, name)
  if name not in DATASETS:
    raise KeyError(f"unknown data set '{name}'; known: {sorted(DATASETS)}")
  folder = os.path.join(download_root(data_dir), name)
  os.makedirs(folder, exist_ok=True)
  for url, md5 in DATASETS[name]["urls"]:
    path = os.path.join(folder, url.rsplit("/", 1)[-1])
    if os.path.exists(path) and _md5(path) == md5:
      continue
    print(f"downloading {url} -> {path}")
    tmp = path + ".part"
    with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
      while True:
        chunk = response.read(1 << 20)
        if not chunk:
          break
        f.write(chunk)
    got = _md5(tmp)
    if got != md5:
      os.remove(tmp)
      raise IOError(f"checksum mismatch for {url}: md5 {got}, expected {md5}.")
    os.replace(tmp, path)
  return folder


DATASET_OF_PROBLEM = {
    **{f"fmnist_{m}": "fashion-mnist" for m in ("logreg", "mlp", "2c2d", "vae")},
    **{f"mnist_{m}": "mnist" for m in ("logreg", "mlp", "2c2d", "vae")},
    "cifar10_3c3d": "cifar-10", "cifar100_3c3d": "cifar-100",
    "cifar100_allcnnc": "cifar-100", "svhn_3c3d": "svhn", "svhn_wrn164": "svhn",
}
