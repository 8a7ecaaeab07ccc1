"""InCTRL (nagl/methods/inctrl.py, nagl/methods/text_prior.py) on small tensors.

The tests of the spec's defects: a batch equals its items one by one, prompt order does
not change the score, a checkpoint refuses another grid, the focal loss reads
probabilities; plus k = 1, parameter counts, the text path on a tiny seeded CLIP, and
save / load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from nagl.errors import NaglError
from nagl.methods import create_method, load_method
from nagl.methods.inctrl import InctrlMethod, binary_focal_loss
from nagl.methods.text_prior import (
    NO_TEXT_ENCODER,
    ClipTextEncoder,
    TextPrior,
    class_prompts,
    text_state_dict,
    text_tower_status,
)

GRID = (4, 4)
LEVELS = {"fine": [4, 4, 6], "coarse": [4, 4, 10]}
EMBED_DIM = 12


def make_method(seed: int = 0, **settings) -> InctrlMethod:
    return create_method("inctrl", 16, levels=LEVELS, embed_dim=EMBED_DIM, seed=seed, **settings)


def features(n: int, seed: int, levels=LEVELS, embed_dim: int = EMBED_DIM) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(n, h * w, c, generator=g) for name, (h, w, c) in levels.items()}
    out["embed"] = torch.randn(n, embed_dim, generator=g)
    return out


def take(levels: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {name: tensor[index] for name, tensor in levels.items()}


@dataclass
class FakeBatch:
    """The part of EpisodeBatch that InCTRL's loss reads: each item its own prompts and category."""

    queries: dict[str, torch.Tensor]
    prompts: list[dict[str, torch.Tensor]]
    label: list[int]
    category: list[str]

    def __len__(self) -> int:
        return len(self.label)

    def query_levels(self):
        return self.queries

    def normal_levels(self, i: int):
        return self.prompts[i]

    def categories(self):
        return self.category

    def labels(self):
        return torch.tensor(self.label, dtype=torch.float32)


def fake_batch(seed: int, shots=(2, 1, 3, 2), categories=("a", "b", "a", "b")) -> FakeBatch:
    queries = features(len(shots), seed)
    prompts = [features(k, seed + 100 + i) for i, k in enumerate(shots)]
    return FakeBatch(queries, prompts, [i % 2 for i in range(len(shots))], list(categories))


def trained(seed: int = 0, steps: int = 5, text_encoder=None, **settings) -> InctrlMethod:
    method = make_method(seed, **settings)
    if text_encoder is not None:
        method.use_text_encoder(text_encoder)
    module = method.trainable_module()
    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module.train()
    for step in range(steps):
        loss, _ = method.loss(fake_batch(step))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    module.eval()
    return method


# ------------------------------------------------------------------ shapes --

@pytest.mark.parametrize(("embed_dim", "side", "expected"), [(640, 15, 333_186), (1280, 32, 1_131_778)])
def test_parameter_counts_match_the_spec(embed_dim, side, expected):
    method = create_method("inctrl", 8, levels={"a": [side, side, 4], "b": [side, side, 4]}, embed_dim=embed_dim)
    assert method.parameter_counts() == (expected, expected)


def test_patch_map_is_the_residual_and_the_score_mixes_it_with_the_holistic_head():
    method = trained()
    query, prompts = features(3, 1), features(2, 2)
    maps, scores = method.score(query, prompts)
    assert maps.shape == (3, *GRID) and scores.shape == (3,)
    # M by hand: cosine distance to the nearest prompt patch of each level, averaged over levels.
    expected = torch.zeros(3, 16)
    for name in LEVELS:
        q = torch.nn.functional.normalize(query[name], dim=-1)
        p = torch.nn.functional.normalize(prompts[name].reshape(-1, prompts[name].shape[-1]), dim=-1)
        expected += (1 - (q @ p.T).amax(dim=-1)) / 2
    torch.testing.assert_close(maps.reshape(3, -1), expected / 2, atol=1e-6, rtol=0)
    # A query equal to a prompt has M = 0, so its score is s_h / 2 < 0.5.
    same, _ = method.score(take(prompts, slice(0, 1)), prompts)
    assert float(same.abs().max()) < 1e-6
    assert torch.all((scores > 0) & (scores < 1))


# ------------------------------------------------------- defects of the code --

def test_a_batch_scores_like_its_items_one_by_one():
    method = trained()
    query, prompts = features(5, 3), features(3, 4)
    maps, scores = method.score(query, prompts)
    for i in range(5):
        one_map, one_score = method.score(take(query, slice(i, i + 1)), prompts)
        torch.testing.assert_close(one_map[0], maps[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(one_score[0], scores[i], atol=1e-6, rtol=0)


def test_a_training_batch_in_eval_mode_scores_each_item_with_its_own_prompts():
    method = trained()
    batch = fake_batch(7)
    with torch.no_grad():
        _, scores = method.loss(batch)
    for i in range(len(batch)):
        _, alone = method.score(take(batch.queries, slice(i, i + 1)), batch.prompts[i])
        torch.testing.assert_close(alone[0], scores[i], atol=1e-6, rtol=0)


def test_prompt_order_does_not_change_the_score():
    method = trained()
    query, prompts = features(4, 5), features(4, 6)
    _, scores = method.score(query, prompts)
    _, shuffled = method.score(query, take(prompts, torch.tensor([2, 0, 3, 1])))
    torch.testing.assert_close(shuffled, scores, atol=1e-6, rtol=0)


def test_one_prompt_works_in_scoring_and_training():
    method = trained()
    maps, scores = method.score(features(3, 8), features(1, 9))
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    method.trainable_module().train()
    loss, _ = method.loss(fake_batch(10, shots=(1, 1, 1, 1)))
    loss.backward()
    assert math.isfinite(float(loss.detach()))


def test_another_grid_or_width_is_refused():
    method = trained()
    with pytest.raises(NaglError, match="4x4 grid"):
        method.score(features(2, 1, levels={"fine": [5, 5, 6], "coarse": [5, 5, 10]}),
                     features(2, 2, levels={"fine": [5, 5, 6], "coarse": [5, 5, 10]}))
    with pytest.raises(NaglError, match="width 6"):
        method.score(features(2, 1, levels={"fine": [4, 4, 7], "coarse": [4, 4, 10]}), features(2, 2))
    with pytest.raises(NaglError, match="expects"):
        method.score(features(2, 1, embed_dim=13), features(2, 2))
    with pytest.raises(NaglError, match="trained for the grid"):
        method.score(features(2, 1), features(2, 2), grid={"fine": (2, 8), "coarse": (2, 8)})
    with pytest.raises(NaglError, match="share one grid"):
        create_method("inctrl", 16, levels={"a": [4, 4, 6], "b": [2, 2, 6]}, embed_dim=EMBED_DIM)


def test_references_other_than_normal_prompts_are_refused():
    method = make_method()
    with pytest.raises(NaglError, match="k_abnormal = 0"):
        method.score(features(2, 1), features(2, 2), features(1, 3))
    with pytest.raises(NaglError, match="k_normal >= 1"):
        method.score(features(2, 1), features(0, 2))
    with pytest.raises(NaglError, match="embed_dim is None"):
        create_method("inctrl", 16, levels=LEVELS, embed_dim=None)


def test_focal_loss_reads_probabilities():
    p, y = torch.tensor([0.8, 0.8, 0.3]), torch.tensor([1.0, 0.0, 1.0])
    expected = torch.tensor([-(0.2 ** 2) * math.log(0.8), -(0.8 ** 2) * math.log(0.2), -(0.7 ** 2) * math.log(0.3)])
    torch.testing.assert_close(binary_focal_loss(p, y), expected.mean())
    # gamma 0, alpha 1: binary cross-entropy of the probabilities (no second sigmoid).
    torch.testing.assert_close(binary_focal_loss(p, y, gamma=0.0), torch.nn.functional.binary_cross_entropy(p, y))
    # The public code's defect, kept only behind the switch: a sigmoid on the probabilities.
    torch.testing.assert_close(binary_focal_loss(p, y, focal_input="logit"), binary_focal_loss(torch.sigmoid(p), y))
    with pytest.raises(NaglError, match="focal_input"):
        binary_focal_loss(p, y, focal_input="odds")


def test_training_loss_is_the_focal_loss_of_the_final_and_the_image_residual_scores():
    method = trained()
    batch = fake_batch(11)
    with torch.no_grad():
        loss, scores = method.loss(batch)
        labels = batch.labels()
        prototype = torch.stack([method.head.psi(p["embed"]).mean(dim=0) for p in batch.prompts])
        s_i = torch.sigmoid(method.head.eta(prototype - method.head.psi(batch.queries["embed"]))).squeeze(-1)
    torch.testing.assert_close(loss, binary_focal_loss(scores, labels) + binary_focal_loss(s_i, labels))


# ----------------------------------------------------------------- text prior --

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}


class CountingEncoder:
    def __init__(self, encode):
        self.encode, self.calls = encode, 0

    def __call__(self, prompts):
        self.calls += 1
        return self.encode(prompts)


def test_prompt_lists_follow_the_spec():
    normal, anomaly = class_prompts("metal_nut")
    assert len(normal) == 7 * 22 and len(anomaly) == 4 * 22 and len(set(normal + anomaly)) == 11 * 22
    assert "a photo of the flawless metal nut for visual inspection." in normal
    assert "a jpeg corrupted photo of a metal nut with defect." in anomaly
    assert class_prompts("cat", "class-pair") == (["a photo of cat for anomaly detection."],
                                                  ["a photo without cat for anomaly detection."])


def test_text_path_on_a_tiny_seeded_clip_text_tower():
    encoder = CountingEncoder(ClipTextEncoder.build(EMBED_DIM, TINY_TEXT, seed=0))
    prior = TextPrior(encoder)
    classes = prior.class_embeddings("metal_nut")
    assert classes.shape == (2, EMBED_DIM)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(2))
    embed = features(3, 1)["embed"]
    s_t = prior(embed, ["metal_nut", "screw", "metal_nut"])
    assert torch.all((s_t > 0) & (s_t < 1))
    cos = torch.nn.functional.normalize(embed[0], dim=0) @ classes.T
    torch.testing.assert_close(s_t[0], (100 * cos).softmax(dim=0)[1])
    assert encoder.calls == 4  # normal + anomaly prompts of two categories, each encoded once

    method = trained(text_encoder=encoder, text_prior=True, text_prior_reason="test: a tiny seeded text tower")
    query, prompts = features(3, 2), features(2, 3)
    _, with_text = method.score(query, prompts, category="metal_nut")
    _, other_category = method.score(query, prompts, category="screw")
    assert not torch.allclose(with_text, other_category)
    with pytest.raises(NaglError, match="category"):
        method.score(query, prompts)
    plain = trained()
    with pytest.raises(NaglError, match="without the text prior"):
        plain.use_text_encoder(encoder)


def test_text_tower_loads_strictly_from_a_full_clip_state_dict():
    import open_clip

    vision = {"image_size": 32, "patch_size": 16, "width": 16, "layers": 1, "head_width": 8}
    torch.manual_seed(0)
    clip = open_clip.CLIP(EMBED_DIM, vision, TINY_TEXT)
    state = text_state_dict(clip.state_dict())
    assert state and not any(k.startswith("visual.") for k in state)
    encoder = ClipTextEncoder.build(EMBED_DIM, TINY_TEXT, state=state, seed=123)
    prompts = ["a photo of a screw.", "damaged screw"]
    with torch.no_grad():
        torch.testing.assert_close(encoder(prompts), clip.encode_text(open_clip.tokenize(prompts)))
    with pytest.raises(NaglError, match="do not fit"):
        ClipTextEncoder.build(EMBED_DIM, TINY_TEXT, state={k: v for k, v in state.items() if k != "ln_final.bias"})
    assert text_state_dict(clip.visual.state_dict()) == {}


@pytest.mark.parametrize("backbone", ["effnet-lite0", "tiny-clip", "clip-vit-b-16-plus-240"])
def test_text_prior_is_off_without_a_loaded_text_tower(backbone):
    from nagl.models.backbones import create_backbone

    with torch.device("meta"):
        model = create_backbone(backbone, random_init=True)
    status = text_tower_status(model)
    assert status["text_prior"] is False and status["text_encoder"] is None
    if backbone == "clip-vit-b-16-plus-240":
        assert "random" in status["text_prior_reason"]
    else:
        assert status["text_prior_reason"] == NO_TEXT_ENCODER


def test_text_prior_is_on_with_a_clip_backbone_whose_weights_keep_the_text_tower(monkeypatch, tmp_path):
    """A tiny CLIP registered with a weights file: the imported file keeps the text tower, the
    method config turns the prior on, and the tower is loaded back from that file when scoring."""
    import open_clip

    from nagl.methods import text_prior
    from nagl.models import backbones, weights
    from nagl.models.backbones import BACKBONES, TINY_CLIP_CONFIG, create_backbone

    spec = weights.WeightSpec(backbone="tiny-clip", file_name="tiny-clip.safetensors", kind="open_clip",
                              source="a tiny test CLIP", hub_repo="nobody/tiny-clip",
                              hub_files=("open_clip_model.safetensors",), open_clip_model="tiny-clip-test")
    monkeypatch.setitem(BACKBONES.entries, "tiny-clip", backbones.BackboneEntry(BACKBONES.get("tiny-clip").factory, spec))
    monkeypatch.delenv(weights.env_var("tiny-clip"), raising=False)
    monkeypatch.setenv("NAGL_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    embed_dim = TINY_CLIP_CONFIG["embed_dim"]
    monkeypatch.setattr(text_prior, "clip_text_config", lambda name: (embed_dim, dict(TINY_TEXT)))
    torch.manual_seed(4)
    clip = open_clip.CLIP(embed_dim, TINY_CLIP_CONFIG["vision_cfg"], TINY_TEXT)
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), checkpoint)
    backbones.import_weights("tiny-clip", checkpoint)

    status = text_tower_status(create_backbone("tiny-clip", random_init=False))
    assert status["text_prior"] is True and status["text_encoder"]["text_cfg"] == TINY_TEXT
    encoder = text_prior.load_text_encoder(status["text_encoder"])
    prompts = ["a photo of a screw.", "damaged screw"]
    with torch.no_grad():
        torch.testing.assert_close(encoder(prompts), clip.encode_text(open_clip.tokenize(prompts)))

    method = create_method("inctrl", 16, levels=LEVELS, embed_dim=embed_dim, **status)
    query, prompts_ = features(2, 1, embed_dim=embed_dim), features(2, 2, embed_dim=embed_dim)
    _, scores = method.score(query, prompts_, category="screw")  # loads the tower from the file
    off = create_method("inctrl", 16, levels=LEVELS, embed_dim=embed_dim)
    assert not torch.allclose(scores, off.score(query, prompts_)[1])
    (tmp_path / "weights" / "tiny-clip.safetensors").write_bytes(b"another file")
    fresh = create_method("inctrl", 16, levels=LEVELS, embed_dim=embed_dim, **status)
    with pytest.raises(NaglError, match="not the one"):
        fresh.score(query, prompts_, category="screw")


# -------------------------------------------------------------- checkpoints --

def test_save_and_load_round_trip(tmp_path):
    method = trained(seed=3)
    method.save(tmp_path / "model", {"source": "test"})
    loaded = load_method(tmp_path / "model")
    query, prompts = features(3, 4), features(2, 5)
    for a, b in zip(method.score(query, prompts), loaded.score(query, prompts), strict=True):
        assert torch.equal(a, b)
    info = (tmp_path / "model" / "model.json").read_text()
    assert '"text_prior": false' in info and NO_TEXT_ENCODER in info and "patch residual M" in info
    wider = create_method("inctrl", 16, levels={"fine": [5, 5, 6], "coarse": [5, 5, 10]}, embed_dim=EMBED_DIM)
    with pytest.raises(NaglError, match="G = 25"):
        wider.load_state_dict(method.state_dict())


# ------------------------------------------------------------- in the harness --

def test_batch_spec_asks_for_balanced_normal_only_episodes_and_profiles_are_registered():
    from nagl.training.schedule import schedule_for

    spec = make_method().batch_spec((2, 4), (1,))
    assert (spec.normal_shots, spec.abnormal_shots, spec.mask_size) == ((2, 4), (0,), None)
    assert spec.balanced and spec.needs_embed and spec.level_group == "patch"
    paper = schedule_for("paper", method="inctrl")
    assert (paper.epochs, paper.episodes // paper.batch, paper.batch, paper.lr, paper.weight_decay,
            paper.milestones, paper.select) == (10, 100, 16, 1e-3, 0.01, (), "last")
    embedded = schedule_for("embedded", method="inctrl")
    assert (embedded.batch, embedded.select, embedded.val_fraction) == (16, "best", 0.2)


def test_a_query_is_never_its_own_prompt_in_the_episode_draw():
    import numpy as np
    import pandas as pd

    from nagl.training.episodes import BalancedSampler, draw_batch, split_source

    rows = [{"category": c, "label": label, "defect_type": "good" if label == 0 else "crack", "mask_path": None}
            for c in ("a", "b") for label in [0] * 4 + [1] * 3]
    manifest = pd.DataFrame(rows)
    spec = make_method().batch_spec((1, 3), (1,))
    pool, _, skipped = split_source(manifest, spec, 0.0, seed=0)
    assert not skipped
    rng = np.random.default_rng(0)
    sampler = BalancedSampler(pool, rng)
    episodes = [e for _ in range(40) for e in draw_batch(pool, rng, spec, 16, epoch=1, sampler=sampler)]
    assert sum(e.label for e in episodes) == len(episodes) // 2
    for episode in episodes:
        assert episode.query not in episode.normal and episode.abnormal == ()
        assert len(episode.normal) in (1, 3)
        assert all(manifest.at[i, "category"] == episode.category and manifest.at[i, "label"] == 0
                   for i in episode.normal)
        assert manifest.at[episode.query, "category"] == episode.category


MINI_REGISTRY = """
datasets:
  ic-source:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick, gravel]
    counts: {train_good: 6, test_good: 3, test_anomalous: 6}
  ic-target:
    kind: embedded
    domain: industrial-object
    preset: objects
    categories: [coins]
    counts: {train_good: 4, test_good: 4, test_anomalous: 4}
"""


def test_trained_on_the_source_and_evaluated_in_normal_only_cells(project, monkeypatch):
    """End to end on tiny embedded sets (effnet-lite0 at 64 px, grid 8x8): the checkpoint records its
    shapes and the text prior's state; only k_abnormal = 0 cells are written; scores are s in (0, 1)."""
    import json
    from pathlib import Path

    import pandas as pd

    from nagl.config import validate_config
    from nagl.data.prepare import prepare_dataset
    from nagl.evaluate import evaluate_job
    from nagl.paths import model_dir
    from nagl.training import schedule as schedules
    from nagl.training.loop import train_from_config
    from nagl.training.schedule import Schedule

    project(MINI_REGISTRY)
    for name in ("ic-source", "ic-target"):
        prepare_dataset(name, version=False)
    tiny = Schedule(profile="embedded", epochs=2, episodes=8, batch=4, lr=1e-3, weight_decay=0.01)
    monkeypatch.setitem(schedules.METHOD_PROFILES, ("inctrl", "embedded"), tiny)
    config = validate_config({"backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32,
                              "methods": ["inctrl"], "sources": ["ic-source"], "targets": ["ic-target"],
                              "shots": {"k_normal": [1, 2], "k_abnormal": [0, 1]}, "seeds": [0],
                              "training": {"profile": "embedded", "seeds": [0]}})
    folder = model_dir(config.results, "inctrl", "effnet-lite0", "ic-source", 0)
    result = train_from_config(config, "inctrl", "ic-source", 0, folder)
    assert result.schedule.normal_shots == (1, 2)
    info = json.loads((folder / "model.json").read_text())
    assert info["config"]["levels"] == {"grid-coarse": [8, 8, 112], "grid-fine": [8, 8, 40]}
    assert info["config"]["text_prior"] is False and info["config"]["text_prior_reason"] == NO_TEXT_ENCODER
    assert info["params_head"] == result.method.parameter_counts()[0]

    cells = evaluate_job(config, "inctrl", "ic-source", "ic-target", 0)
    assert sorted(Path(c).name for c in cells) == ["n1a0s0", "n2a0s0"]
    for cell in cells:
        scores = pd.read_parquet(Path(cell) / "scores.parquet")["score"]
        assert ((scores > 0) & (scores < 1)).all()
        metrics = json.loads((Path(cell) / "metrics.json").read_text())
        assert metrics["pixel"]["auroc"] is not None  # the pixel map M
