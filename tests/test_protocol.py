"""Reference splits: seeded, nested, leakage-free, independent of manifest order and of the queries."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from nagl.errors import NaglError
from nagl.protocol import MANIFEST_COLUMNS, ReferenceSplit, draw_reference_split, split_seed


def manifest_rows(dataset, category, train_good, test_good, defects):
    rows = []

    def add(split, defect, index, label):
        stem = f"{index:03d}"
        mask = f"{category}/ground_truth/{defect}/{stem}_mask.png" if label else None
        rows.append(
            dict(
                dataset=dataset,
                category=category,
                split=split,
                label=label,
                defect_type=defect,
                image_path=f"{category}/{split}/{defect}/{stem}.png",
                mask_path=mask,
                image_sha256=hashlib.sha256(f"{dataset}/{category}/{split}/{defect}/{stem}".encode()).hexdigest(),
                width=32,
                height=32,
            )
        )

    for i in range(train_good):
        add("train", "good", i, 0)
    for i in range(test_good):
        add("test", "good", i, 0)
    for defect, count in defects.items():
        for i in range(count):
            add("test", defect, i, 1)
    return rows


@pytest.fixture
def manifest():
    rows = manifest_rows("toy", "bottle", 10, 5, {"crack": 4, "hole": 3})
    rows += manifest_rows("toy", "tiny", 2, 2, {"dent": 1})
    rows += manifest_rows("other", "bottle", 10, 5, {"crack": 4})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["category", "split", "defect_type", "image_path"])


def paths(frame):
    return list(frame["image_path"])


def test_split_seed_is_stable_and_depends_on_all_three_parts():
    base = split_seed("toy", "bottle", 0)
    assert isinstance(base, int) and 0 <= base < 2**63
    assert split_seed("toy", "bottle", 0) == base
    assert len({base, split_seed("toy", "bottle", 1), split_seed("toy", "cable", 0), split_seed("mvtec", "bottle", 0)}) == 4
    with pytest.raises(NaglError, match="seed"):
        split_seed("toy", "bottle", "0")


def test_roles_come_from_the_right_subsets_and_queries_exclude_abnormal_references(manifest):
    split = draw_reference_split(manifest, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=2)
    toy = manifest[(manifest["dataset"] == "toy") & (manifest["category"] == "bottle")]
    train_good = set(toy.loc[toy["split"] == "train", "image_path"])
    test = toy[toy["split"] == "test"]
    assert len(split.normal) == 4 and set(split.normal["image_path"]) <= train_good
    assert len(split.abnormal) == 2 and set(split.abnormal["image_path"]) <= set(test.loc[test["label"] == 1, "image_path"])
    assert set(split.queries["image_path"]) == set(test["image_path"]) - set(split.abnormal["image_path"])
    assert len(split.queries) == 12 - 2
    assert (split.queries["label"] == 1).sum() == 5
    assert (split.abnormal["dataset"] == "toy").all() and (split.normal["category"] == "bottle").all()


def test_nested_shots_and_queries_identical_for_every_setting(manifest):
    small = draw_reference_split(manifest, "toy", "bottle", seed=1, max_k_normal=2, max_k_abnormal=1)
    large = draw_reference_split(manifest, "toy", "bottle", seed=1, max_k_normal=4, max_k_abnormal=1)
    assert paths(large.normal)[:2] == paths(small.normal)
    assert paths(large.abnormal) == paths(small.abnormal)  # the abnormal draw ignores max_k_normal
    assert paths(large.queries) == paths(small.queries)
    assert paths(large.normal_for(1)) == paths(large.normal)[:1]
    assert paths(large.normal_for(2)) == paths(small.normal)
    assert large.abnormal_for(0).empty
    assert paths(large.abnormal_for(1)) == paths(large.abnormal)
    more_abnormal = draw_reference_split(manifest, "toy", "bottle", seed=1, max_k_normal=4, max_k_abnormal=3)
    assert paths(more_abnormal.abnormal)[:1] == paths(large.abnormal)
    with pytest.raises(NaglError, match="k_normal=5"):
        large.normal_for(5)


def test_manifest_row_order_does_not_matter(manifest):
    first = draw_reference_split(manifest, "toy", "bottle", seed=2, max_k_normal=4, max_k_abnormal=1)
    shuffled = manifest.sample(frac=1.0, random_state=123).reset_index(drop=True)
    second = draw_reference_split(shuffled, "toy", "bottle", seed=2, max_k_normal=4, max_k_abnormal=1)
    assert second.hash == first.hash
    pd.testing.assert_frame_equal(second.normal, first.normal)
    pd.testing.assert_frame_equal(second.queries, first.queries)


def test_references_do_not_depend_on_normal_queries(manifest):
    first = draw_reference_split(manifest, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=2)
    fewer_good = manifest[~manifest["image_path"].isin(["bottle/test/good/000.png", "bottle/test/good/003.png"])]
    second = draw_reference_split(fewer_good, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=2)
    assert paths(second.normal) == paths(first.normal)
    assert paths(second.abnormal) == paths(first.abnormal)
    assert len(second.queries) == len(first.queries) - 2


def test_seeds_give_different_draws(manifest):
    draws = {
        tuple(paths(draw_reference_split(manifest, "toy", "bottle", s, 4, 2).normal)) for s in range(5)
    }
    assert len(draws) > 1
    again = draw_reference_split(manifest, "toy", "bottle", 3, 4, 2)
    assert again.hash == draw_reference_split(manifest, "toy", "bottle", 3, 4, 2).hash


def test_other_datasets_in_the_manifest_are_ignored(manifest):
    split = draw_reference_split(manifest, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=1)
    only_toy = manifest[manifest["dataset"] == "toy"]
    assert draw_reference_split(only_toy, "toy", "bottle", 0, 4, 1).hash == split.hash
    assert (split.queries["dataset"] == "toy").all()


def test_too_few_anomalies_or_train_images_fail_naming_the_category(manifest):
    with pytest.raises(NaglError, match=r"toy/tiny.*1 anomalous test images"):
        draw_reference_split(manifest, "toy", "tiny", 0, max_k_normal=1, max_k_abnormal=1)
    with pytest.raises(NaglError, match=r"toy/tiny has 2 train/good"):
        draw_reference_split(manifest, "toy", "tiny", 0, max_k_normal=4, max_k_abnormal=0)
    split = draw_reference_split(manifest, "toy", "tiny", 0, max_k_normal=2, max_k_abnormal=0)
    assert (split.queries["label"] == 1).sum() == 1
    with pytest.raises(NaglError, match=r"toy/cable: no such category"):
        draw_reference_split(manifest, "toy", "cable", 0, 1, 0)
    with pytest.raises(NaglError, match="lacks columns"):
        draw_reference_split(manifest.drop(columns=["image_sha256"]), "toy", "bottle", 0, 1, 0)
    with pytest.raises(NaglError, match="max_k_abnormal"):
        draw_reference_split(manifest, "toy", "bottle", 0, 1, -1)


def test_json_round_trip_and_tamper_detection(manifest, tmp_path):
    split = draw_reference_split(manifest, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=2)
    obj = json.loads(json.dumps(split.to_json()))
    assert obj["hash"] == split.hash and len(obj["hash"]) == 64
    assert obj["max_k_normal"] == 4 and obj["max_k_abnormal"] == 2
    assert obj["abnormal"][0]["mask_path"].startswith("bottle/ground_truth/")
    assert obj["normal"][0]["mask_path"] is None
    back = ReferenceSplit.from_json(obj)
    assert back.hash == split.hash
    for role in ("normal", "abnormal", "queries"):
        pd.testing.assert_frame_equal(getattr(back, role), getattr(split, role))

    split.write(tmp_path / "split.json")
    assert ReferenceSplit.read(tmp_path / "split.json").hash == split.hash

    obj["normal"][0], obj["normal"][1] = obj["normal"][1], obj["normal"][0]  # order is part of the split
    with pytest.raises(NaglError, match="hash does not match"):
        ReferenceSplit.from_json(obj)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NaglError, match="bad.json"):
        ReferenceSplit.read(tmp_path / "bad.json")


def test_hash_covers_content_hashes(manifest):
    first = draw_reference_split(manifest, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=1)
    changed = manifest.copy()
    target = first.normal["image_path"].iloc[0]
    changed.loc[changed["image_path"].eq(target) & changed["dataset"].eq("toy"), "image_sha256"] = "f" * 64
    second = draw_reference_split(changed, "toy", "bottle", seed=0, max_k_normal=4, max_k_abnormal=1)
    assert paths(second.normal) == paths(first.normal)
    assert second.hash != first.hash
