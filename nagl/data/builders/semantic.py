"""MNIST and CIFAR-10 as semantic anomaly detection (image level), InCTRL's two protocols.

Option ``protocol``:

- ``one-vs-all`` (default): category ``c<k>`` has class k normal and all others anomalous;
- ``multiclass``: MNIST ``even`` (even digits normal, odd anomalous), CIFAR-10
  ``animals`` (bird, cat, deer, dog, frog, horse normal; the vehicles anomalous).

In every category the official training images of the normal classes go to
``train/good``, their test images to ``test/good`` and the test images of the
other classes to ``test/<class name>``; files are named ``<split>_<index:05d>.png``
after their index in the official split. Sources: MNIST's four IDX ``.gz`` files
(a ``files:`` release), CIFAR-10's python pickles (``cifar-10-python.tar.gz``),
read by an unpickler that admits only the numpy types of those files.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from nagl.data import layout
from nagl.data.builders.common import extracted_files
from nagl.data.converters import _extracted, _find_dirs, _select, _where, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

PROTOCOLS = ("one-vs-all", "multiclass")
MNIST_CLASSES = tuple(str(d) for d in range(10))
MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_ANIMALS = (2, 3, 4, 5, 6, 7)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
_IDX_UINT8 = 0x08


@register_builder("mnist")
def build_mnist(spec: DatasetSpec, out_dir: Path) -> None:
    with extracted_files(spec, Path(out_dir)) as folders:
        files = {p.name: p for root in folders.values() for p in root.rglob("*") if p.is_file()}
        arrays = {}
        for key, name in MNIST_FILES.items():
            if name not in files:
                raise NaglError(f"{_where(spec)}: the option 'files' must list MNIST's {name}.gz; found {sorted(files)}")
            arrays[key] = read_idx(files[name])
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise NaglError(f"{_where(spec)}: MNIST {split} has {len(arrays[f'{split}_images'])} images but "
                            f"{len(arrays[f'{split}_labels'])} labels; the files are of different releases")
    write_semantic(spec, Path(out_dir), (arrays["train_images"], arrays["train_labels"]),
                   (arrays["test_images"], arrays["test_labels"]), MNIST_CLASSES, ("even", (0, 2, 4, 6, 8)))


@register_builder("cifar10")
def build_cifar10(spec: DatasetSpec, out_dir: Path) -> None:
    with _extracted(spec, Path(out_dir)) as root:
        found = _find_dirs(root, lambda d: d.name == CIFAR_FOLDER)
        if len(found) != 1:
            raise NaglError(f"{_where(spec)}: {spec.options['filename']} holds no folder {CIFAR_FOLDER}/; "
                            f"is it cifar-10-python.tar.gz?")
        train = [read_cifar_batch(found[0] / name) for name in CIFAR_TRAIN]
        test = read_cifar_batch(found[0] / CIFAR_TEST)
    train_images = np.concatenate([images for images, _labels in train])
    train_labels = np.concatenate([labels for _images, labels in train])
    write_semantic(spec, Path(out_dir), (train_images, train_labels), test, CIFAR_CLASSES, ("animals", CIFAR_ANIMALS))


def write_semantic(spec: DatasetSpec, out_dir: Path, train: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray], class_names: tuple[str, ...],
                   multiclass: tuple[str, tuple[int, ...]]) -> None:
    """One category per task of the ``protocol`` option (``categories`` keeps a subset)."""
    protocol = spec.options.get("protocol", "one-vs-all")
    if protocol not in PROTOCOLS:
        raise NaglError(f"{_where(spec)}: option 'protocol' must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "one-vs-all":
        tasks = {f"c{k}": (k,) for k in range(len(class_names))}
    else:
        tasks = {multiclass[0]: multiclass[1]}
    for labels in (train[1], test[1]):
        if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names):
            raise NaglError(f"{_where(spec)}: labels outside 0..{len(class_names) - 1}; is it the right release?")
    encoded_test: dict[int, bytes] = {}
    for category in _select(spec, {name: Path(name) for name in tasks}, f"protocol {protocol!r}"):
        normal = np.isin(train[1], tasks[category])
        dst = out_dir / category
        for index in np.flatnonzero(normal):
            _write(dst / layout.TRAIN / layout.GOOD / f"train_{index:05d}.png", _png(train[0][index]))
        for index, label in enumerate(test[1].tolist()):
            folder = layout.GOOD if label in tasks[category] else class_names[label]
            if index not in encoded_test:
                encoded_test[index] = _png(test[0][index])
            _write(dst / layout.TEST / folder / f"test_{index:05d}.png", encoded_test[index])
    check_counts(spec, out_dir)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST): labels ``(n,)`` or images ``(n, rows, cols)``."""
    data = path.read_bytes()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UINT8 or data[3] not in (1, 3):
        raise NaglError(f"{path}: not an IDX file of unsigned bytes (MNIST); is it the right file?")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise NaglError(f"{path}: header says {shape} but the file holds {len(data) - offset} values; "
                        f"the file is incomplete")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's python batches contain: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x 32 x 32 x 3 uint8, labels N)`` from one python batch of CIFAR-10."""
    if not path.is_file():
        raise NaglError(f"{path} is missing; the CIFAR-10 archive is incomplete")
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise NaglError(f"{path}: not a CIFAR-10 python batch ({error}); is it the right archive?") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise NaglError(f"{path}: data has shape {data.shape} and {len(labels)} labels, expected N x 3072 and N")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
