"""Small archives in each dataset's ORIGINAL release layout, for the converter tests.

Every image is a few pixels of seeded noise, so archives are built in
milliseconds and are byte-identical from run to run. Each builder returns a
:class:`FixtureArchive` (its path and sha256) and the counts a correct
conversion must produce.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from nagl.io import sha256_file

SIZE = (12, 10)  # width, height


@dataclass
class FixtureArchive:
    path: Path
    sha256: str
    # category -> {"train_good": n, "test_good": n, "test_anomalous": n, "masks": n}
    expected: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.path.name


def image_bytes(seed: int, fmt: str = "PNG", mode: str = "RGB", size=SIZE) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def mask_bytes(seed: int, fmt: str = "PNG", high: int = 255, size=SIZE) -> bytes:
    """A mask with a small rectangle of value ``high`` (VisA uses 1, others 255)."""
    width, height = size
    values = np.zeros((height, width), dtype=np.uint8)
    top = seed % (height - 3)
    values[top:top + 3, 2:6] = high
    buffer = io.BytesIO()
    Image.fromarray(values, "L").save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar (compression from the suffix: .tar, .tar.gz, .tar.xz) with fixed metadata."""
    mode = {".gz": "w:gz", ".xz": "w:xz"}.get(path.suffix, "w")
    with tarfile.open(path, mode) as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in sorted(members.items()):
            zipped.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return path


def _done(path: Path, expected: dict) -> FixtureArchive:
    return FixtureArchive(path=path, sha256=sha256_file(path), expected=expected)


def mvtec_archive(directory: Path, filename: str = "mvtec_anomaly_detection.tar.xz",
                  top: str = "") -> FixtureArchive:
    """MVTec AD: ``<category>/train/good``, ``test/good``, ``test/<defect>``,
    ``ground_truth/<defect>/<stem>_mask.png``, plus the release's text files.
    ``top`` puts everything under one more folder (MPDD)."""
    members = {f"{top}license.txt": b"CC BY-NC-SA 4.0\n", f"{top}readme.txt": b"MVTec AD\n"}
    seed = 0
    plan = {"bottle": {"broken_large": 2, "contamination": 1}, "grid": {"bent": 1}}
    expected = {}
    for category, defects in plan.items():
        for i in range(3):
            members[f"{top}{category}/train/good/{i:03d}.png"] = image_bytes(seed := seed + 1)
        for i in range(2):
            members[f"{top}{category}/test/good/{i:03d}.png"] = image_bytes(seed := seed + 1)
        for defect, count in defects.items():
            for i in range(count):
                members[f"{top}{category}/test/{defect}/{i:03d}.png"] = image_bytes(seed := seed + 1)
                members[f"{top}{category}/ground_truth/{defect}/{i:03d}_mask.png"] = mask_bytes(seed)
        n_anomalous = sum(defects.values())
        expected[category] = {"train_good": 3, "test_good": 2, "test_anomalous": n_anomalous,
                              "masks": n_anomalous}
    path = directory / filename
    if path.suffix == ".zip":
        write_zip(path, members)
    else:
        write_tar(path, members)
    return _done(path, expected)


def mpdd_archive(directory: Path) -> FixtureArchive:
    """MPDD: the MVTec layout, here below a top folder ``MPDD/`` of a zip."""
    return mvtec_archive(directory, filename="mpdd.zip", top="MPDD/")


def visa_archive(directory: Path) -> FixtureArchive:
    """VisA_20220922.tar: ``<object>/Data/Images/{Normal,Anomaly}/*.JPG``,
    ``<object>/Data/Masks/Anomaly/*.png`` (0/1-valued), ``<object>/image_anno.csv``
    and ``split_csv/1cls.csv`` (object,split,label,image,mask)."""
    members = {"LICENSE-DATASET": b"CC BY 4.0\n"}
    rows = ["object,split,label,image,mask"]
    seed = 100
    expected = {}
    for category in ("candle", "pcb1"):
        members[f"{category}/image_anno.csv"] = b"image,label,mask\n"
        for i in range(5):  # 3 train, 2 test normals
            name = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            members[name] = image_bytes(seed := seed + 1, fmt="JPEG")
            rows.append(f"{category},{'train' if i < 3 else 'test'},normal,{name},")
        for i in range(2):
            name = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
            mask = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            members[name] = image_bytes(seed := seed + 1, fmt="JPEG")
            members[mask] = mask_bytes(seed, high=1)
            rows.append(f"{category},test,anomaly,{name},{mask}")
        expected[category] = {"train_good": 3, "test_good": 2, "test_anomalous": 2, "masks": 2}
    members["split_csv/1cls.csv"] = ("\n".join(rows) + "\n").encode()
    members["split_csv/2cls_fewshot.csv"] = b"object,split,label,image,mask\n"
    return _done(write_tar(directory / "VisA_20220922.tar", members), expected)


def btad_archive(directory: Path) -> FixtureArchive:
    """btad.zip: ``BTech_Dataset_transformed/<01|02|03>/{train/ok,test/ok,test/ko,ground_truth/ko}``;
    images .bmp (01, 03) or .png (02), masks .png (01, 02) or .bmp (03), named like the image."""
    formats = {"01": ("BMP", "png"), "02": ("PNG", "png"), "03": ("BMP", "bmp")}
    members = {}
    seed = 200
    expected = {}
    for category, (image_format, mask_ext) in formats.items():
        image_ext = image_format.lower()
        base = f"BTech_Dataset_transformed/{category}"
        for i in range(2):
            members[f"{base}/train/ok/{i:04d}.{image_ext}"] = image_bytes(seed := seed + 1, fmt=image_format)
            members[f"{base}/test/ok/{i + 10:04d}.{image_ext}"] = image_bytes(seed := seed + 1, fmt=image_format)
        for i in range(3):
            members[f"{base}/test/ko/{i:04d}.{image_ext}"] = image_bytes(seed := seed + 1, fmt=image_format)
            members[f"{base}/ground_truth/ko/{i:04d}.{mask_ext}"] = mask_bytes(seed, fmt=mask_ext.upper())
        expected[category] = {"train_good": 2, "test_good": 2, "test_anomalous": 3, "masks": 3}
    return _done(write_zip(directory / "btad.zip", members), expected)


def brats_archive(directory: Path) -> FixtureArchive:
    """MedIAnomaly-Data BraTS2021.tar.gz: ``BraTS2021/train/*.png``, ``test/normal``,
    ``test/tumor/*flair*.png`` and ``test/annotation/*seg*.png`` (grayscale slices)."""
    members = {}
    seed = 300
    for i in range(4):
        members[f"BraTS2021/train/BraTS2021_{i:05d}_flair_60.png"] = image_bytes(seed := seed + 1, mode="L")
    for i in range(2):
        members[f"BraTS2021/test/normal/BraTS2021_{i + 10:05d}_flair_50.png"] = image_bytes(seed := seed + 1, mode="L")
    for i in range(3):
        members[f"BraTS2021/test/tumor/BraTS2021_{i + 20:05d}_flair_70.png"] = image_bytes(seed := seed + 1, mode="L")
        members[f"BraTS2021/test/annotation/BraTS2021_{i + 20:05d}_seg_70.png"] = mask_bytes(seed)
    expected = {"brats2021": {"train_good": 4, "test_good": 2, "test_anomalous": 3, "masks": 3}}
    return _done(write_tar(directory / "BraTS2021.tar.gz", members), expected)


def rsna_archive(directory: Path) -> FixtureArchive:
    """MedIAnomaly-Data RSNA.tar.gz, an image-level set: ``RSNA/images/*.png`` + ``RSNA/data.json``."""
    members = {}
    index = {"train": {"0": [], "unlabeled": {}}, "test": {"0": [], "1": []}}
    seed = 400
    for group, key, count in (("train", "0", 3), ("test", "0", 2), ("test", "1", 2)):
        for _ in range(count):
            name = f"{seed:05d}.png"
            members[f"RSNA/images/{name}"] = image_bytes(seed := seed + 1, mode="L")
            index[group][key].append(name)
    members["RSNA/data.json"] = json.dumps(index).encode()
    expected = {"rsna": {"train_good": 3, "test_good": 2, "test_anomalous": 2, "masks": 0}}
    return _done(write_tar(directory / "RSNA.tar.gz", members), expected)


def canonical_dataset(root: Path) -> Path:
    """A valid dataset in the canonical layout: categories 'a' and 'b', each with
    2 train/good, 1 test/good, 2 test/scratch (with masks); 8x6 RGB."""
    seed = 0
    for category in ("a", "b"):
        for split, defect, count in (("train", "good", 2), ("test", "good", 1), ("test", "scratch", 2)):
            for i in range(count):
                seed += 1
                pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
                path = root / category / split / defect / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    for category in ("a", "b"):
        for i in range(2):
            mask = np.zeros((6, 8), np.uint8)
            mask[1:3, 1 + i:4 + i] = 255
            path = root / category / "ground_truth" / "scratch" / f"{i:03d}_mask.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, "L").save(path)
    return root
