"""The run config: typed, defaults from the schema, names checked against the registries,
backbone and image size checked when it loads (so in `nagl run --dry-run`)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from nagl.config import cell_settings_hash, load_config, validate_config
from nagl.errors import NaglError
from nagl.io import stable_hash
from nagl.settings import project_dir


def default_raw() -> dict:
    return yaml.safe_load((project_dir() / "config" / "config.yaml").read_text())


def test_the_default_config_loads_typed_and_frozen():
    config = load_config()
    assert config.shots.k_normal == (1, 2, 4) and config.shots.k_abnormal == (0, 1)
    assert config.training.profile == "embedded" and config.backbone == "effnet-lite0"
    assert config.shots.settings()[:3] == [(1, 0), (1, 1), (2, 0)]
    assert config.trainable_methods == ["nagl", "nagl-cal", "inctrl"] and "nagl" not in config.training_free_methods
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backbone = "other"  # type: ignore[misc]
    assert validate_config(config.as_dict()) == config  # the JSON form reads back the same


def test_defaults_come_from_the_schema():
    raw = default_raw()
    for key in ("results", "report"):
        raw.pop(key)
    raw["training"].pop("seeds")
    config = validate_config(raw)
    assert (config.results, config.report, config.training.seeds) == ("results", "reports/leaderboard.html",
                                                                        (0, 1, 2))


def test_the_old_training_seed_setting_names_its_replacement():
    raw = default_raw()
    raw["training"] = {"profile": "embedded", "seed": 3}
    with pytest.raises(NaglError, match=r"training\.seed is no longer a setting; write training\.seeds.*\[3\]"):
        validate_config(raw)


def test_cell_settings_hash_leaves_the_training_seeds_out():
    """The training seed is part of a cell's key (runs.train_seed): adding a training seed
    must not change the settings hash of the cells of the other seeds."""
    config = load_config()
    expected = stable_hash({"method": "nagl", "backbone": "effnet-lite0", "image_size": 256,
                            "eval_resolution": 256, "training": {"profile": "embedded"}})
    assert cell_settings_hash(config, "nagl") == expected
    more = default_raw()
    more["training"]["seeds"] = [0, 1, 2, 3]
    assert cell_settings_hash(validate_config(more), "nagl") == expected


@pytest.mark.parametrize(("change", "message"), [
    ({"methods": ["nagl", "patchcore"]}, r"methods: unknown method 'patchcore'; choose one of: .*knn-normal"),
    ({"training": {"profile": "fast"}}, r"training.profile: unknown training profile 'fast'; choose one of: embedded"),
    ({"backbone": "resnet9000"}, r"backbone: unknown backbone 'resnet9000'; choose one of: .*effnet-lite0"),
    ({"image_size": 100}, r"image_size 100 does not suit backbone 'effnet-lite0': .*multiple of 32"),
    ({"backbone": "tiny-clip", "image_size": 72}, r"image_size 72 does not suit backbone 'tiny-clip': .*multiple of 16"),
])
def test_bad_names_and_sizes_fail_at_load(change, message):
    with pytest.raises(NaglError, match=message):
        validate_config({**default_raw(), **change}, origin="my.yaml")


def test_dry_run_fails_on_a_backbone_that_cannot_take_the_image_size(tmp_path):
    from nagl.cli.main import _app

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**default_raw(), "image_size": 200}))
    result = CliRunner().invoke(_app, ["run", "--dry-run", "--config", str(path)])
    assert isinstance(result.exception, NaglError)
    assert f"{path}: image_size 200 does not suit backbone 'effnet-lite0'" in str(result.exception)
