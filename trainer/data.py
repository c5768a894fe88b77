"""Image classification data: where samples come from and which of them a run uses.

Every source ends up as two pools of `Sample`s (train and test) plus the class list; `select`
then draws the run's training and evaluation samples. Sources:

- `digits`: scikit-learn's 8x8 digits (shipped with the package, so it works offline), labels
  "zero".."nine", split once into fixed train/test pools;
- `oxford-iiit-pet`: the Hub data set `timm/oxford-iiit-pet` through `datasets`; with a path, a
  local copy in any of three layouts — the original archive (`images/*.jpg`,
  `annotations/trainval.txt`, `annotations/test.txt`), a `datasets` `save_to_disk` directory, or
  the Hub repository's parquet files (`data/train-*.parquet`, `data/test-*.parquet`). The three
  Hugging Face forms share one parsing path (`_from_hf`);
- `imagefolder:/dir`: one folder per class, with `train/` and `test/` sub-folders when the data
  set has its own split, or a fixed split of the whole otherwise.

Images are opened lazily (`Sample.image()`), so a 7,000-image data set costs nothing until used.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from trainer.contract.spec import Dataset

HF_PET_DATASET = "timm/oxford-iiit-pet"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Fixed, not the run's seed: the test pool and the evaluation sample must be the same for every
# run, so that runs are compared on the same images (the paired quality gate pairs them by id).
SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
IMAGEFOLDER_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A data set that cannot be used as given; the message says what is wrong."""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    label: str
    load: Callable[[], Image.Image] = field(repr=False, compare=False)

    def image(self) -> Image.Image:
        return self.load().convert("RGB")


@dataclass(frozen=True)
class Pools:
    """Everything a source holds: the class list and its train and test pools."""

    labels: list[str]
    train: list[Sample]
    test: list[Sample]
    source: str


@dataclass(frozen=True)
class Splits:
    """What one run uses, and the sizes the spec asked for (a pool smaller than its size is
    used whole: `shortfalls` says so, so that a run never trains on less than it seems to)."""

    labels: list[str]
    train: list[Sample]
    eval: list[Sample]
    source: str
    train_size_requested: int = 0
    eval_size_requested: int = 0

    def shortfalls(self) -> list[str]:
        """One sentence per size the data set could not give in full (none when both fit)."""
        out = []
        for name, asked, got in (
            ("training", self.train_size_requested, len(self.train)),
            ("evaluation", self.eval_size_requested, len(self.eval)),
        ):
            if got < asked:
                split = "train" if name == "training" else "test"
                out.append(
                    f"{asked} {name} samples were asked for, but the {split} split of "
                    f"{self.source} holds only {got}: using all {got}"
                )
        return out

    def sizes(self) -> dict[str, int]:
        """Requested and used sizes, for results.json."""
        return {
            "train_size_requested": self.train_size_requested,
            "train_samples": len(self.train),
            "eval_size_requested": self.eval_size_requested,
            "eval_samples": len(self.eval),
        }


# ---- selection --------------------------------------------------------------------------------


def select(pools: Pools, train_size: int, eval_size: int, seed: int) -> Splits:
    """Draw `train_size` training samples (by `seed`) and `eval_size` evaluation samples.

    Evaluation comes from the test pool only, so it never overlaps training. It is stratified by
    round robin over the classes, so every class appears once `eval_size` reaches the number of
    classes, and it does not depend on `seed`, so a bigger evaluation extends a smaller one and
    runs with different seeds are scored on the same samples. A size larger than its pool takes
    the whole pool, and the result's `shortfalls` say so (the caller warns and records it).
    """
    train = list(pools.train)
    random.Random(seed).shuffle(train)
    return Splits(
        labels=pools.labels,
        train=train[:train_size],
        eval=stratified(pools.test, eval_size, SPLIT_SEED),
        source=pools.source,
        train_size_requested=train_size,
        eval_size_requested=eval_size,
    )


def stratified(samples: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.sample_id):
        by_class[s.label].append(s)
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        queues.append(group)
    out: list[Sample] = []
    depth = 0
    while len(out) < size and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: size - len(out)]
        depth += 1
    return out


def _fixed_split(samples: Sequence[Sample], test_fraction: float) -> tuple[list, list]:
    """Split one pool into train and test, per class, the same way every time."""
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.sample_id):
        by_class[s.label].append(s)
    rng = random.Random(SPLIT_SEED)
    train: list[Sample] = []
    test: list[Sample] = []
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction) if len(group) > 1 else 0
        test += group[:n_test]
        train += group[n_test:]
    return train, test


# ---- sources ----------------------------------------------------------------------------------


def load_pools(dataset: Dataset | str) -> Pools:
    ds = Dataset.parse(dataset) if isinstance(dataset, str) else dataset
    if ds.kind == "digits":
        return load_digits()
    if ds.kind == "imagefolder":
        assert ds.path is not None  # Dataset.parse guarantees it
        return load_imagefolder(Path(ds.path))
    if ds.path is None:
        return load_pet_hub()
    return load_pet_local(Path(ds.path))


def load_digits() -> Pools:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    samples = []
    for i, (pixels, target) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        samples.append(Sample(f"digits-{i:04d}", DIGIT_NAMES[int(target)], _digit_loader(pixels)))
    train, test = _fixed_split(samples, DIGITS_TEST_FRACTION)
    return Pools(list(DIGIT_NAMES), train, test, "scikit-learn digits")


def _digit_loader(pixels: Any) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import numpy as np

        # 0..16 ink on 0 background; scale to bytes and enlarge so that any processor's resize
        # starts from a picture rather than 8x8 blocks.
        arr = (np.asarray(pixels, dtype=np.float32) * (255.0 / 16.0)).clip(0, 255)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
        return img.resize((32, 32), Image.Resampling.NEAREST)

    return load


def pet_label(name: str) -> str:
    """The breed named by an Oxford-IIIT Pet file name or class name:
    `english_cocker_spaniel_12.jpg` and `english_cocker_spaniel` → "English Cocker Spaniel"."""
    stem = Path(name).stem if "." in name else name
    stem = re.sub(r"_\d+$", "", stem)
    return " ".join(word.capitalize() for word in stem.split("_") if word)


def load_pet_local(root: Path) -> Pools:
    """A local or mounted copy of Oxford-IIIT Pet, in the archive or a Hugging Face layout."""
    if not root.is_dir():
        raise DataError(f"oxford-iiit-pet: {root} is not a directory")
    if (root / "annotations").is_dir():
        return load_pet_archive(root)
    if (root / "dataset_dict.json").is_file():
        import datasets

        return _from_hf(datasets.load_from_disk(str(root)), f"{root} (datasets on disk)")
    parquet = _parquet_files(root)
    if parquet:
        import datasets

        loaded = datasets.load_dataset("parquet", data_files=parquet)
        return _from_hf(loaded, f"{root} (parquet)")
    raise DataError(
        f"oxford-iiit-pet: {root} holds none of the known layouts: the original archive "
        "(images/*.jpg with annotations/trainval.txt and annotations/test.txt), a datasets "
        "save_to_disk directory (dataset_dict.json) or parquet files (data/train-*.parquet and "
        "data/test-*.parquet)"
    )


def load_pet_hub() -> Pools:
    import datasets

    return _from_hf(datasets.load_dataset(HF_PET_DATASET), HF_PET_DATASET)


def _parquet_files(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for split in ("train", "test"):
        files = sorted(str(p) for p in root.glob(f"**/{split}-*.parquet"))
        files += sorted(str(p) for p in root.glob(f"**/{split}.parquet"))
        if files:
            found[split] = files
    return found


def _from_hf(dsdict: Any, source: str) -> Pools:
    """Pools from a `datasets.DatasetDict` with `train` and `test` splits, an `image` column and
    a `label` ClassLabel column (`timm/oxford-iiit-pet`'s schema; `image_id` is used when there)."""
    missing = {"train", "test"} - set(dsdict)
    if missing:
        raise DataError(f"{source}: no {' or '.join(sorted(missing))} split (has {list(dsdict)})")
    features = dsdict["train"].features
    if "image" not in features or "label" not in features:
        raise DataError(f"{source}: needs 'image' and 'label' columns (has {list(features)})")
    names = getattr(features["label"], "names", None)
    if not names:
        raise DataError(f"{source}: the 'label' column is not a ClassLabel with names")
    labels = [pet_label(n) for n in names]
    pools = {}
    for split in ("train", "test"):
        ds = dsdict[split]
        # Reading the id and label columns alone avoids decoding every image up front.
        ids = ds["image_id"] if "image_id" in ds.column_names else None
        targets = ds["label"]
        pools[split] = [
            Sample(
                str(ids[i]) if ids is not None else f"{split}-{i:05d}",
                labels[int(targets[i])],
                _hf_loader(ds, i),
            )
            for i in range(len(ds))
        ]
    return Pools(sorted(labels), pools["train"], pools["test"], source)


def _hf_loader(ds: Any, index: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        image: Image.Image = ds[index]["image"]
        return image

    return load


def load_pet_archive(root: Path) -> Pools:
    images = root / "images"
    pools: dict[str, list[Sample]] = {}
    for split, listing in (("train", "trainval.txt"), ("test", "test.txt")):
        path = root / "annotations" / listing
        if not path.is_file():
            raise DataError(f"oxford-iiit-pet archive at {root}: missing annotations/{listing}")
        pools[split] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            stem = line.split()[0]
            image_path = images / f"{stem}.jpg"
            if not image_path.is_file():
                raise DataError(f"annotations/{listing} lists {stem}, but {image_path} is missing")
            pools[split].append(Sample(stem, pet_label(stem), _file_loader(image_path)))
    labels = sorted({s.label for s in pools["train"]} | {s.label for s in pools["test"]})
    return Pools(labels, pools["train"], pools["test"], f"{root} (Oxford-IIIT Pet archive)")


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as img:
            img.load()
            return img

    return load


def load_imagefolder(root: Path) -> Pools:
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = _scan_classes(root / "train", "train")
        test = _scan_classes(root / "test", "test")
    else:
        train, test = _fixed_split(_scan_classes(root, ""), IMAGEFOLDER_TEST_FRACTION)
    labels = sorted({s.label for s in train} | {s.label for s in test})
    if len(labels) < 2:
        raise DataError(f"imagefolder: {root} needs at least two class folders with images")
    if not test:
        raise DataError(f"imagefolder: {root} has too few images to hold out a test split")
    return Pools(labels, train, test, f"{root} (image folders)")


def _scan_classes(root: Path, prefix: str) -> list[Sample]:
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = class_dir.name.replace("_", " ").strip()
        for image_path in sorted(_images(class_dir)):
            rel = image_path.relative_to(root).as_posix()
            sample_id = f"{prefix}/{rel}" if prefix else rel
            samples.append(Sample(sample_id, label, _file_loader(image_path)))
    return samples


def _images(folder: Path) -> Iterable[Path]:
    return (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_splits(dataset: Dataset | str, train_size: int, eval_size: int, seed: int) -> Splits:
    return select(load_pools(dataset), train_size, eval_size, seed)
