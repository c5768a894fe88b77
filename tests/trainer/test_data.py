"""Data loaders against real files: generated fixtures in the Oxford-IIIT Pet archive layout,
the Hugging Face layouts (save_to_disk, parquet), image folders, and scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from trainer import data
from trainer.data import DataError, Pools, load_pools, pet_label, select, stratified

# (file-name stem prefix, breed name): a cat (capitalised stems), multi-word dogs, and a breed
# whose name holds another's ("English Cocker Spaniel" / "Cocker Spaniel" is the classic trap).
BREEDS = {
    "Abyssinian": "Abyssinian",
    "english_cocker_spaniel": "English Cocker Spaniel",
    "american_pit_bull_terrier": "American Pit Bull Terrier",
}


def _jpg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), (shade, 255 - shade, 40)).save(path, "JPEG")


@pytest.fixture
def pet_archive(tmp_path: Path) -> Path:
    """The original archive layout: images/*.jpg and annotations/{trainval,test}.txt."""
    root = tmp_path / "oxford-iiit-pet"
    trainval: list[str] = ["#Image CLASS-ID SPECIES BREED ID"]
    test: list[str] = []
    for class_id, stem in enumerate(BREEDS, start=1):
        species = 1 if stem[0].isupper() else 2
        for i in range(1, 9):
            name = f"{stem}_{i}"
            _jpg(root / "images" / f"{name}.jpg", 20 * i)
            line = f"{name} {class_id} {species} {class_id}"
            (trainval if i <= 5 else test).append(line)
    (root / "annotations").mkdir()
    (root / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    return root


def _hf_dataset_dict(n_per_class: int = 4) -> Any:
    """A DatasetDict with `timm/oxford-iiit-pet`'s schema: image, label (ClassLabel with the
    lower-case underscore names), image_id."""
    import datasets

    names = ["abyssinian", "english_cocker_spaniel", "american_pit_bull_terrier"]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "image_id": datasets.Value("string"),
        }
    )
    splits = {}
    for split in ("train", "test"):
        rows: dict[str, list] = {"image": [], "label": [], "image_id": []}
        for label, name in enumerate(names):
            for i in range(n_per_class):
                rows["image"].append(Image.new("RGB", (20, 20), (10 * i, 50 * label, 0)))
                rows["label"].append(label)
                rows["image_id"].append(f"{name}_{split}_{i}")
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def test_pet_label_from_file_and_class_names() -> None:
    assert pet_label("english_cocker_spaniel_12.jpg") == "English Cocker Spaniel"
    assert pet_label("english_cocker_spaniel_12") == "English Cocker Spaniel"
    assert pet_label("english_cocker_spaniel") == "English Cocker Spaniel"
    assert pet_label("Abyssinian_100.jpg") == "Abyssinian"
    assert pet_label("american_pit_bull_terrier_3") == "American Pit Bull Terrier"
    assert pet_label("great_pyrenees") == "Great Pyrenees"


def test_pet_archive_layout(pet_archive: Path) -> None:
    pools = load_pools(f"oxford-iiit-pet:{pet_archive}")
    assert pools.labels == sorted(BREEDS.values())
    assert len(pools.train) == 15 and len(pools.test) == 9
    sample = next(s for s in pools.train if s.sample_id == "english_cocker_spaniel_3")
    assert sample.label == "English Cocker Spaniel"
    image = sample.image()
    assert image.mode == "RGB" and image.size == (24, 16)
    assert {s.sample_id for s in pools.train}.isdisjoint(s.sample_id for s in pools.test)


def test_pet_archive_reports_what_is_missing(pet_archive: Path) -> None:
    (pet_archive / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match=r"annotations/test\.txt"):
        load_pools(f"oxford-iiit-pet:{pet_archive}")


def test_pet_archive_reports_a_listed_image_that_is_missing(pet_archive: Path) -> None:
    (pet_archive / "images" / "Abyssinian_2.jpg").unlink()
    with pytest.raises(DataError, match="Abyssinian_2"):
        load_pools(f"oxford-iiit-pet:{pet_archive}")


def test_unknown_layout_says_which_layouts_work(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="archive"):
        load_pools(f"oxford-iiit-pet:{tmp_path}")


def test_hugging_face_layout_saved_to_disk(tmp_path: Path) -> None:
    _hf_dataset_dict().save_to_disk(str(tmp_path / "pets"))
    pools = load_pools(f"oxford-iiit-pet:{tmp_path / 'pets'}")
    assert pools.labels == sorted(BREEDS.values())
    assert len(pools.train) == 12 and len(pools.test) == 12
    sample = next(s for s in pools.test if s.sample_id == "english_cocker_spaniel_test_2")
    assert sample.label == "English Cocker Spaniel"
    assert sample.image().size == (20, 20)


def test_hugging_face_parquet_layout_like_the_hub_repository(tmp_path: Path) -> None:
    """The Hub repository's own files (data/train-*.parquet, data/test-*.parquet) keep the
    ClassLabel names in the parquet metadata, so a mounted copy parses the same way."""
    dsdict = _hf_dataset_dict(n_per_class=2)
    (tmp_path / "pets" / "data").mkdir(parents=True)
    for split, ds in dsdict.items():
        ds.to_parquet(str(tmp_path / "pets" / "data" / f"{split}-00000-of-00001.parquet"))
    pools = load_pools(f"oxford-iiit-pet:{tmp_path / 'pets'}")
    assert pools.labels == sorted(BREEDS.values())
    assert sorted(s.sample_id for s in pools.train) == sorted(dsdict["train"]["image_id"])
    labels = {s.sample_id: s.label for s in pools.test}
    assert labels["american_pit_bull_terrier_test_1"] == "American Pit Bull Terrier"


def test_imagefolder_with_its_own_split(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "golden_retriever"):
            for i in range(n):
                _jpg(tmp_path / split / cls / f"{i}.jpg", 30 * i)
    pools = load_pools(f"imagefolder:{tmp_path}")
    assert pools.labels == ["cat", "golden retriever"]
    assert len(pools.train) == 8 and len(pools.test) == 4
    assert all(s.sample_id.startswith("test/") for s in pools.test)


def test_imagefolder_without_a_split_is_split_the_same_way_every_time(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(10):
            _jpg(tmp_path / cls / f"{i}.png", 20 * i)
    first = load_pools(f"imagefolder:{tmp_path}")
    second = load_pools(f"imagefolder:{tmp_path}")
    assert [s.sample_id for s in first.test] == [s.sample_id for s in second.test]
    assert len(first.test) == 4 and len(first.train) == 16
    assert {s.label for s in first.test} == {"a", "b"}
    assert {s.sample_id for s in first.train}.isdisjoint(s.sample_id for s in first.test)


def test_imagefolder_needs_two_classes(tmp_path: Path) -> None:
    for i in range(5):
        _jpg(tmp_path / "only" / f"{i}.jpg", i)
    with pytest.raises(DataError, match="two class folders"):
        load_pools(f"imagefolder:{tmp_path}")


def test_digits() -> None:
    pools = data.load_digits()
    assert pools.labels == [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    ]
    assert len(pools.train) + len(pools.test) == 1797
    assert 340 <= len(pools.test) <= 380
    assert {s.sample_id for s in pools.train}.isdisjoint(s.sample_id for s in pools.test)
    image = pools.test[0].image()
    assert image.mode == "RGB" and image.size == (32, 32)
    # The images are the real digits: ink where the data set has it.
    assert max(image.convert("L").tobytes()) > 200


def test_selection_is_deterministic_by_seed_and_evaluation_is_fixed() -> None:
    pools = data.load_digits()
    a = select(pools, 100, 30, seed=1)
    b = select(pools, 100, 30, seed=1)
    c = select(pools, 100, 30, seed=2)
    ids = lambda samples: [s.sample_id for s in samples]  # noqa: E731
    assert ids(a.train) == ids(b.train)
    assert ids(a.train) != ids(c.train)
    # Runs with different seeds are scored on the same evaluation samples.
    assert ids(a.eval) == ids(c.eval)
    test_ids = {s.sample_id for s in pools.test}
    assert set(ids(a.eval)) <= test_ids
    assert set(ids(a.train)).isdisjoint(test_ids)
    # A larger evaluation extends a smaller one.
    assert ids(select(pools, 10, 50, seed=3).eval)[:30] == ids(a.eval)


def test_evaluation_is_stratified_so_every_class_appears() -> None:
    pools = data.load_digits()
    for size in (10, 25, 97):
        chosen = select(pools, 1, size, seed=0).eval
        counts = {label: sum(s.label == label for s in chosen) for label in pools.labels}
        assert len(chosen) == size
        assert min(counts.values()) >= 1
        assert max(counts.values()) - min(counts.values()) <= 1


def test_stratified_with_uneven_classes_takes_what_there_is(pet_archive: Path) -> None:
    pools = load_pools(f"oxford-iiit-pet:{pet_archive}")
    one_cat = [s for s in pools.test if s.label == "Abyssinian"][:1]
    uneven = [s for s in pools.test if s.label != "Abyssinian"] + one_cat
    chosen = stratified(uneven, 100, seed=0)
    assert sorted(s.sample_id for s in chosen) == sorted(s.sample_id for s in uneven)


def test_sizes_larger_than_the_pools_take_the_whole_pool_and_say_so() -> None:
    pools = Pools(["x", "y"], [], [], "empty")
    assert select(pools, 10, 10, seed=0).train == []
    digits = data.load_digits()
    chosen = select(digits, 100_000, 100_000, seed=0)
    n_train, n_test = len(digits.train), len(digits.test)
    assert len(chosen.train) == n_train and len(chosen.eval) == n_test
    # Not silently: the shortfall is said, with both numbers, and the sizes are recorded.
    assert chosen.shortfalls() == [
        f"100000 training samples were asked for, but the train split of scikit-learn digits "
        f"holds only {n_train}: using all {n_train}",
        f"100000 evaluation samples were asked for, but the test split of scikit-learn digits "
        f"holds only {n_test}: using all {n_test}",
    ]
    assert chosen.sizes() == {
        "train_size_requested": 100_000,
        "train_samples": n_train,
        "eval_size_requested": 100_000,
        "eval_samples": n_test,
    }
    # One size too large, the other fine: only that one is reported.
    only_train = select(digits, n_train + 1, 20, seed=0).shortfalls()
    assert len(only_train) == 1 and only_train[0].startswith(f"{n_train + 1} training samples")


def test_sizes_that_fit_report_nothing() -> None:
    digits = data.load_digits()
    chosen = select(digits, len(digits.train), len(digits.test), seed=0)
    assert chosen.shortfalls() == []
    assert chosen.sizes()["train_samples"] == chosen.sizes()["train_size_requested"]
