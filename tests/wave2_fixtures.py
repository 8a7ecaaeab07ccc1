"""Small releases of the reference benchmarks' datasets (docs/datasets.md), in each release's own
layout and archive format, with its quirks. Images are a few pixels, so everything is built in
milliseconds; each function returns the archive(s) and the counts a correct conversion gives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import py7zr
from dataset_fixtures import image_bytes, write_tar, write_zip
from PIL import Image

from nagl.io import sha256_file


@dataclass
class Release:
    """Archives placed in the downloads folder and the registry options that name them."""

    options: dict
    expected: dict = field(default_factory=dict)  # category -> counts (as tests/test_converters.counts)
    paths: list[Path] = field(default_factory=list)


def md5_file(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def single(path: Path, checksum: str = "sha256", **options) -> Release:
    digest = {"sha256": sha256_file, "md5": md5_file}[checksum](path)
    return Release(options={"url": f"https://example.org/{path.name}", "filename": path.name,
                            checksum: digest, **options}, paths=[path])


def multi(paths: list[Path], checksum: str = "md5", **options) -> Release:
    digest = {"sha256": sha256_file, "md5": md5_file}[checksum]
    files = [{"url": f"https://example.org/{p.name}", "filename": p.name, checksum: digest(p)} for p in paths]
    return Release(options={"files": files, **options}, paths=paths)


def counts(train_good: int, test_good: int, test_anomalous: int, masks: int = 0) -> dict:
    return {"train_good": train_good, "test_good": test_good, "test_anomalous": test_anomalous, "masks": masks}


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def grey(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=(height, width), dtype=np.uint8) * 60


def write_7z(path: Path, members: dict[str, bytes]) -> Path:
    with py7zr.SevenZipFile(path, "w") as seven:
        for name, data in sorted(members.items()):
            seven.writestr(data, name)
    return path


def seven_zip_with_name(path: Path, placeholder: str, name: str) -> Path:
    """A .7z whose member is called ``name`` (py7zr refuses to write names like '../x' itself):
    written as ``placeholder`` (same length) with a plain header, renamed in place, CRCs fixed."""
    assert len(placeholder) == len(name)
    with py7zr.SevenZipFile(path, "w") as seven:
        seven.set_encoded_header_mode(False)
        seven.writestr(b"ok", "ok.txt")
        seven.writestr(b"evil", placeholder)
    raw = bytearray(path.read_bytes())
    offset, size = struct.unpack("<QQ", raw[12:28])
    start = 32 + offset
    header = bytes(raw[start:start + size]).replace(placeholder.encode("utf-16-le"), name.encode("utf-16-le"))
    raw[start:start + size] = header
    raw[28:32] = struct.pack("<I", zlib.crc32(header))
    raw[8:12] = struct.pack("<I", zlib.crc32(bytes(raw[12:32])))
    path.write_bytes(bytes(raw))
    return path


# MedIAnomaly-Data --------------------------------------------------------------------------------

def camelyon_archive(directory: Path) -> Release:
    """Camelyon16.tar.gz: ``Camelyon16/train/good``, ``test/good``, ``test/Ungood`` (RGB PNG, no masks)."""
    members, seed = {}, 600
    for folder, count in (("train/good", 3), ("test/good", 2), ("test/Ungood", 2)):
        for i in range(count):
            members[f"Camelyon16/{folder}/{folder.split('/')[-1].lower()}_{i}.png"] = image_bytes(seed := seed + 1)
    path = write_tar(directory / "Camelyon16.tar.gz", members)
    release = single(path, "md5", subset="Camelyon16")
    release.expected = {"camelyon16": counts(3, 2, 2)}
    return release


def json_set_archive(directory: Path, subset: str) -> Release:
    """``<Set>.tar.gz`` of an image-level MedIAnomaly set: ``<Set>/images/`` + ``<Set>/data.json``.

    Quirk: the ``unlabeled`` lists name files the archive lacks. BrainTumor and LAG have
    JPEG names (``Tr-no_0001.jpg``, ``Te-gl_0013.jpg``; ``0001.jpg``), RSNA and VinCXR PNG.
    """
    names = {
        "BrainTumor": (["Tr-no_0001.jpg", "Tr-no_0002.jpg", "Tr-no_0003.jpg"], ["Te-no_0010.jpg", "Te-no_0011.jpg"],
                       ["Te-gl_0013.jpg", "Te-me_0014.jpg"]),
        "LAG": (["0001.jpg", "0002.jpg", "0003.jpg"], ["0100.jpg", "0101.jpg"], ["0200.jpg", "0201.jpg"]),
    }.get(subset, ([f"{subset.lower()}-{i:04x}.png" for i in range(3)], ["t0.png", "t1.png"], ["t2.png", "t3.png"]))
    train, test_normal, test_abnormal = names
    members, seed = {}, 700
    for name in train + test_normal + test_abnormal:
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        members[f"{subset}/images/{name}"] = image_bytes(seed := seed + 1, fmt=fmt, mode="L")
    index = {"train": {"0": train, "unlabeled": {"0": ["u0.png"], "1": ["u1.png"]}},
             "test": {"0": test_normal, "1": test_abnormal}}
    members[f"{subset}/data.json"] = json.dumps(index).encode()
    path = write_tar(directory / f"{subset}.tar.gz", members)
    release = single(path, "md5", subset=subset)
    release.expected = {subset.lower(): counts(3, 2, 2)}
    return release


# ISIC 2018 Task 3 ---------------------------------------------------------------------------------

ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def _isic_csv(rows: list[tuple[str, str]]) -> bytes:
    lines = ["image," + ",".join(ISIC_CLASSES)]
    for image, label in rows:
        lines.append(image + "," + ",".join("1.0" if c == label else "0.0" for c in ISIC_CLASSES))
    return ("\n".join(lines) + "\n").encode()


def isic_archives(directory: Path) -> Release:
    """The four zips; inputs hold ``ISIC_<7 digits>.jpg`` plus LICENSE.txt and ATTRIBUTION.txt (skipped)."""
    train = [("ISIC_0024306", "NV"), ("ISIC_0024307", "NV"), ("ISIC_0024308", "NV"), ("ISIC_0024309", "MEL"),
             ("ISIC_0024310", "BKL")]
    test = [("ISIC_0034524", "NV"), ("ISIC_0034525", "NV"), ("ISIC_0034526", "MEL"), ("ISIC_0034527", "BCC"),
            ("ISIC_0034528", "BCC")]
    paths, seed = [], 800
    for part, rows in (("Training", train), ("Test", test)):
        images = {f"ISIC2018_Task3_{part}_Input/{image}.jpg": image_bytes(seed := seed + 1, fmt="JPEG")
                  for image, _label in rows}
        images[f"ISIC2018_Task3_{part}_Input/LICENSE.txt"] = b"CC BY-NC 4.0\n"
        images[f"ISIC2018_Task3_{part}_Input/ATTRIBUTION.txt"] = b"ISIC Archive\n"
        paths.append(write_zip(directory / f"ISIC2018_Task3_{part}_Input.zip", images))
        truth = {f"ISIC2018_Task3_{part}_GroundTruth/ISIC2018_Task3_{part}_GroundTruth.csv": _isic_csv(rows),
                 f"ISIC2018_Task3_{part}_GroundTruth/LICENSE.txt": b"CC BY-NC 4.0\n"}
        paths.append(write_zip(directory / f"ISIC2018_Task3_{part}_GroundTruth.zip", truth))
    release = multi(paths, "sha256")
    release.expected = {"isic2018": counts(3, 2, 3)}
    return release


# AITEX --------------------------------------------------------------------------------------------

def aitex_archives(directory: Path) -> Release:
    """The three .7z archives with 256x1024 images and every quirk of the release:

    two fabric folders, the normal image 0018_00_01 with a 2-digit code, 0044_019_04 with
    ``_mask1`` + ``_mask2``, 0100_025_08 without mask, 0106_010_03 with an empty mask,
    0094_027_05 narrower (900 wide: its last tile is 132 wide).
    """
    height, width = 256, 1024
    normal = {}
    for i, (fabric, stem) in enumerate([("2311694-2040n7u", "0001_000_02"), ("2311694-2040n7u", "0002_000_02"),
                                        ("2311980-L1", "0003_000_05"), ("2311980-L1", "0018_00_01")]):
        normal[f"NODefect_images/{fabric}/{stem}.png"] = png(grey(900 + i, width, height))
    defects, masks = {}, {}

    def mask(*column_ranges: tuple[int, int], w: int = width) -> bytes:
        values = np.zeros((height, w), np.uint8)
        for start, stop in column_ranges:
            values[100:120, start:stop] = 255
        return png(values)

    defects["Defect_images/0001_002_00.png"] = png(grey(950, width, height))
    masks["Mask_images/0001_002_00_mask.png"] = mask((300, 320))  # tile 1
    defects["Defect_images/0044_019_04.png"] = png(grey(951, width, height))
    masks["Mask_images/0044_019_04_mask1.png"] = mask((10, 20))  # tile 0
    masks["Mask_images/0044_019_04_mask2.png"] = mask((600, 610))  # tile 2
    defects["Defect_images/0100_025_08.png"] = png(grey(952, width, height))  # no mask: skipped
    defects["Defect_images/0106_010_03.png"] = png(grey(953, width, height))
    masks["Mask_images/0106_010_03_mask.png"] = mask()  # empty: no tile kept
    defects["Defect_images/0094_027_05.png"] = png(grey(954, 900, height))
    masks["Mask_images/0094_027_05_mask.png"] = mask((800, 850), w=900)  # the narrow tile 3
    paths = [write_7z(directory / "Defect_images.7z", defects), write_7z(directory / "NODefect_images.7z", normal),
             write_7z(directory / "Mask_images.7z", masks)]
    release = multi(paths, "sha256")
    release.expected = {"aitex": counts(12, 4, 4, masks=4)}  # 16 normal tiles -> 12 / 4
    return release


# KolektorSDD --------------------------------------------------------------------------------------

def sdd_archive(directory: Path) -> Release:
    """KolektorSDD.zip: ``kos01``, ``kos02`` with ``PartN.jpg`` (12x30 grey) and ``PartN_label.bmp``;
    the one defect lies only in the middle third (rows 10..19) of kos01/Part1."""
    members = {}
    for k, kos in enumerate(("kos01", "kos02")):
        for part in range(2):
            members[f"{kos}/Part{part}.jpg"] = png(grey(1000 + 2 * k + part, 12, 30), fmt="JPEG")
            label = np.zeros((30, 12), np.uint8)
            if kos == "kos01" and part == 1:
                label[12:16, 3:7] = 255
            members[f"{kos}/Part{part}_label.bmp"] = png(label, fmt="BMP")
    release = single(write_zip(directory / "KolektorSDD.zip", members))
    release.expected = {"sdd": counts(8, 3, 1, masks=1)}  # 12 thirds: 11 normal -> 8 / 3
    return release


# ELPV ---------------------------------------------------------------------------------------------

def elpv_archive(directory: Path) -> Release:
    """The GitHub archive: ``elpv-dataset-master/src/elpv_dataset/data/{images/,labels.csv}``,
    whitespace-separated labels with the probabilities 0, 1/3, 2/3 and 1."""
    base = "elpv-dataset-master/src/elpv_dataset/data"
    rows = [(0.0, "mono")] * 4 + [(0.0, "poly")] * 2 + [(1.0, "mono")] * 2 + [(1.0, "poly")] + \
        [(1 / 3, "mono"), (2 / 3, "poly")]
    members = {"elpv-dataset-master/README.md": b"# ELPV\n"}
    lines = []
    for i, (probability, cell_type) in enumerate(rows, start=1):
        members[f"{base}/images/cell{i:04d}.png"] = png(grey(1100 + i, 10, 10))
        lines.append(f"images/cell{i:04d}.png  {probability!r:<19} {cell_type}")
    members[f"{base}/labels.csv"] = ("\n".join(lines) + "\n").encode()
    release = single(write_zip(directory / "elpv-dataset-master.zip", members), sha256=None)  # none published
    release.expected = {"elpv": counts(4, 2, 3)}
    return release


# Kaggle: BrainMRI, HeadCT -------------------------------------------------------------------------

def brainmri_archive(directory: Path) -> Release:
    """The Kaggle zip: ``no/``, ``yes/`` and their duplicate ``brain_tumor_dataset/{no,yes}`` (with an
    extra file, to show it is not read); mixed extensions, names with spaces."""
    top = {"no": ["1 no.jpeg", "N2.JPG", "3 no.png", "no 4.jpg"], "yes": ["Y1.jpg", "Y2.JPG", "Y 3.png"]}
    members, seed = {}, 1200
    for folder, names in top.items():
        for name in names:
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            data = image_bytes(seed := seed + 1, fmt=fmt)
            members[f"{folder}/{name}"] = data
            members[f"brain_tumor_dataset/{folder}/{name}"] = data
    members["brain_tumor_dataset/yes/Y99.jpg"] = image_bytes(1299, fmt="JPEG")
    release = single(write_zip(directory / "brain-mri-images-for-brain-tumor-detection.zip", members), sha256=None,
                     download="manual")
    release.expected = {"brainmri": counts(3, 1, 3)}
    return release


def headct_archive(directory: Path) -> Release:
    """The Kaggle zip: ``labels.csv`` (header ``id, hemorrhage``) and ``head_ct/head_ct/NNN.png`` of
    varied size and mode (grey, RGB, RGBA)."""
    members = {"labels.csv": b"id, hemorrhage\n" + b"".join(f"{i}, {int(i < 4)}\n".encode() for i in range(8))}
    modes = ["L", "RGB", "RGBA", "L"]
    for i in range(8):
        size = (10 + i, 12)
        mode = modes[i % 4]
        pixels = np.random.default_rng(1300 + i).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        members[f"head_ct/head_ct/{i:03d}.png"] = png(pixels[..., 0] if mode == "L" else pixels)
    release = single(write_zip(directory / "head-ct-hemorrhage.zip", members), sha256=None, download="manual")
    release.expected = {"headct": counts(3, 1, 4)}
    return release


# MNIST, CIFAR-10 ----------------------------------------------------------------------------------

def idx_bytes(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(struct.pack(">I", n) for n in values.shape)
    return header + values.astype(np.uint8).tobytes()


def mnist_images(seed: int, labels: np.ndarray) -> np.ndarray:
    """6x6 'digits': noise whose first pixel is the label (so the tests can check each file)."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 6, 6), dtype=np.uint8)
    images[:, 0, 0] = labels
    return images


def mnist_files(directory: Path) -> Release:
    """The four IDX .gz files: 30 training images (3 per digit), 20 test images (2 per digit)."""
    train_labels = np.tile(np.arange(10, dtype=np.uint8), 3)
    test_labels = np.tile(np.arange(10, dtype=np.uint8), 2)
    arrays = {"train-images-idx3-ubyte": mnist_images(1400, train_labels), "train-labels-idx1-ubyte": train_labels,
              "t10k-images-idx3-ubyte": mnist_images(1401, test_labels), "t10k-labels-idx1-ubyte": test_labels}
    paths = []
    for name, values in arrays.items():
        path = directory / f"{name}.gz"
        path.write_bytes(gzip.compress(idx_bytes(values), mtime=0))
        paths.append(path)
    return multi(paths, "md5")


def cifar_archive(directory: Path) -> Release:
    """cifar-10-python.tar.gz: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, 10 images each
    (one per class), pickles of ``{b'data': N x 3072 uint8 (R, G, B planes), b'labels': [...]}``."""
    members = {"cifar-10-batches-py/readme.html": b"<html></html>"}
    for number, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.random.default_rng(1500 + number).integers(0, 256, (10, 3072), dtype=np.uint8)
        data[:, 0] = np.arange(10)  # the red value of the first pixel is the label
        batch = {b"batch_label": name.encode(), b"labels": list(range(10)), b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(10)]}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": []}, protocol=2)
    return single(write_tar(directory / "cifar-10-python.tar.gz", members), "md5")


# MVTec 3D-AD --------------------------------------------------------------------------------------

def mvtec3d_archive(directory: Path) -> Release:
    """mvtec_3d_anomaly_detection.tar.xz: ``<cat>/{train,validation}/good/{rgb,xyz}``,
    ``<cat>/test/<type>/{rgb,gt,xyz}`` (the good test images have all-zero gt too), text files."""
    members = {"mvtec_3d_anomaly_detection/license.txt": b"CC BY-NC-SA 4.0\n",
               "mvtec_3d_anomaly_detection/readme.txt": b"MVTec 3D-AD\n"}
    seed = 1600
    for category in ("bagel", "cable_gland"):
        base = f"mvtec_3d_anomaly_detection/{category}"
        for split, count in (("train", 3), ("validation", 2)):
            for i in range(count):
                members[f"{base}/{split}/good/rgb/{i:03d}.png"] = image_bytes(seed := seed + 1)
                members[f"{base}/{split}/good/xyz/{i:03d}.tiff"] = image_bytes(seed, fmt="TIFF")
        for defect, count in (("good", 2), ("crack", 2), ("hole", 1)):
            for i in range(count):
                members[f"{base}/test/{defect}/rgb/{i:03d}.png"] = image_bytes(seed := seed + 1)
                members[f"{base}/test/{defect}/xyz/{i:03d}.tiff"] = image_bytes(seed, fmt="TIFF")
                gt = np.zeros((10, 12), np.uint8)
                if defect != "good":
                    gt[2:5, 3:6] = 255
                members[f"{base}/test/{defect}/gt/{i:03d}.png"] = png(gt)
    release = single(write_tar(directory / "mvtec_3d_anomaly_detection.tar.xz", members), "md5")
    release.expected = {c: counts(3, 2, 3, masks=3) for c in ("bagel", "cable_gland")}
    return release
