"""ResAD (``nagl/methods/resad.py``, ``nagl/methods/flow.py``) at small widths: the flow, the
checkpoint, batch invariance, the training step's chunks and optimisers, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from nagl.errors import NaglError
from nagl.methods import load_method
from nagl.methods.flow import ConditionalFlow, CouplingBlock, random_rotation, sincos_position_code
from nagl.methods.resad import ResadMethod, nearest_residual, nearest_residuals
from nagl.training.schedule import Schedule

LEVELS = {"fine": [8, 8, 6], "mid": [4, 4, 10], "coarse": [2, 2, 12]}
SMALL = {"blocks": 2, "pos_dim": 8}


def small_method(**settings) -> ResadMethod:
    return ResadMethod(1, levels=LEVELS, **{**SMALL, **settings})


def level_features(count: int, seed: int, levels=LEVELS) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(count, h * w, c, generator=generator) for name, (h, w, c) in levels.items()}


class LevelBatch:
    """A hand-made training batch with the accessors ResAD reads (queries, own references, masks)."""

    def __init__(self, queries: dict[str, torch.Tensor], references: list[dict[str, torch.Tensor]],
                 masks: torch.Tensor):
        self.queries, self.references, self.masks = queries, references, masks

    def __len__(self) -> int:
        return len(self.references)

    def query_levels(self) -> dict[str, torch.Tensor]:
        return self.queries

    def normal_levels(self, i: int) -> dict[str, torch.Tensor]:
        return self.references[i]

    def query_masks(self) -> torch.Tensor:
        return self.masks

    def labels(self) -> torch.Tensor:
        return self.masks.flatten(1).any(dim=1).float()


def make_batch(size: int = 2, k: int = 2, seed: int = 0) -> LevelBatch:
    queries = level_features(size, seed)
    references = [level_features(k, seed + 100 + i) for i in range(size)]
    masks = torch.zeros(size, 16, 16, dtype=torch.bool)
    masks[-1, :8, :8] = True  # the last query is abnormal in its top-left quarter
    return LevelBatch(queries, references, masks)


def schedule(profile: str = "test") -> Schedule:
    return Schedule(profile=profile, epochs=10, episodes=4, batch=2, lr=1e-3, weight_decay=0.0)


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value, so identities at init cannot hide a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


# -- the flow ---------------------------------------------------------------------------

def test_position_code_halves_encode_column_then_row_with_interleaved_sin_cos():
    code = sincos_position_code((3, 5), 8)
    assert code.shape == (15, 8)
    row, col = 2, 4
    vector = code[row * 5 + col]
    freqs = [1.0, 10000.0 ** (-2 / 4)]
    expected_col = [f(col * w) for w in freqs for f in (math.sin, math.cos)]
    expected_row = [f(row * w) for w in freqs for f in (math.sin, math.cos)]
    assert torch.allclose(vector, torch.tensor(expected_col + expected_row), atol=1e-6)


def test_rotation_is_orthogonal_and_seeded():
    q = random_rotation(7, torch.Generator().manual_seed(3))
    assert torch.allclose(q @ q.T, torch.eye(7), atol=1e-5)
    assert torch.equal(q, random_rotation(7, torch.Generator().manual_seed(3)))
    assert not torch.equal(q, random_rotation(7, torch.Generator().manual_seed(4)))


def test_flow_inverts_and_its_log_det_equals_autograd():
    torch.manual_seed(0)
    flow = perturbed(ConditionalFlow(5, condition=8, blocks=3, clamp=1.9, seed=1)).double()
    code = torch.randn(4, 8, dtype=torch.float64)
    positions = torch.tensor([0, 3, 1, 3, 2, 0])
    x = torch.randn(6, 5, dtype=torch.float64)
    z, log_det = flow(x, code, positions)
    assert torch.allclose(flow.inverse(z, code, positions), x, atol=1e-10)
    for i in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(lambda v, i=i: flow(v[None], code, positions[i:i + 1])[0][0], x[i])
        assert torch.allclose(torch.linalg.slogdet(jacobian).logabsdet, log_det[i], atol=1e-9)
    # a clamp that binds: the log-det stays exact
    assert log_det.abs().max() > 0.1


def test_block_equals_freia_all_in_one_block():
    freia = pytest.importorskip("FrEIA.modules")
    width, condition = 7, 6
    torch.manual_seed(0)
    ours = perturbed(CouplingBlock(width, condition, 1.9, random_rotation(width, torch.Generator().manual_seed(2))))

    def subnet(inputs: int, outputs: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(inputs, 2 * inputs), torch.nn.ReLU(), torch.nn.Linear(2 * inputs, outputs))

    theirs = freia.AllInOneBlock([(width,)], dims_c=[(condition,)], subnet_constructor=subnet, affine_clamping=1.9,
                                 global_affine_type="SOFTPLUS", permute_soft=True)
    with torch.no_grad():
        theirs.subnet.load_state_dict(ours.subnet.state_dict())
        theirs.global_scale.copy_(ours.global_scale[None])
        theirs.global_offset.copy_(ours.global_offset[None])
        theirs.w_perm.copy_(ours.rotation)
        theirs.w_perm_inv.copy_(ours.rotation.T)
    x, c = torch.randn(9, width), torch.randn(9, condition)
    (z_theirs,), log_det_theirs = theirs([x], c=[c])
    z_ours, log_det_ours = ours(x, c, torch.arange(9))
    assert torch.allclose(z_ours, z_theirs, atol=1e-5)
    assert torch.allclose(log_det_ours, log_det_theirs, atol=1e-5)


def test_eval_cache_of_the_condition_follows_the_weights():
    flow = ConditionalFlow(4, condition=8, blocks=1).eval()
    code, x = torch.randn(3, 8), torch.randn(5, 4)
    positions = torch.tensor([0, 1, 2, 2, 1])
    with torch.no_grad():
        before = flow.log_likelihood(x, code, positions)
        flow.blocks[0].subnet[0].bias.add_(1.0)  # an optimiser step changes the weights in place
        after = flow.log_likelihood(x, code, positions)
    flow.train()
    assert torch.allclose(after, flow.log_likelihood(x, code, positions).detach(), atol=1e-6)
    assert not torch.allclose(before, after)


# -- the method ---------------------------------------------------------------------------

def test_residual_is_to_the_nearest_reference_patch_by_l2_or_cosine():
    bank = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    query = torch.tensor([[[6.0, 0.0]]])  # l2: nearer to [10, 1]; cosine: nearer to [1, 0]
    assert torch.allclose(nearest_residual(query, bank, "l2"), torch.tensor([[[-4.0, -1.0]]]))
    assert torch.allclose(nearest_residual(query, bank, "cosine"), torch.tensor([[[5.0, 0.0]]]))
    assert torch.allclose(nearest_residual(query, bank, "l2", "squared"), torch.tensor([[[16.0, 1.0]]]))


def test_nested_reference_counts_share_one_search_bit_for_bit():
    """One search of the 4-reference bank gives the 1-, 2- and 4-shot residuals exactly as a search of
    each smaller bank alone, and scoring with that shared normal side gives the same maps."""
    torch.manual_seed(0)
    query, normal = torch.randn(3, 20, 6), torch.randn(4, 20, 6)
    for match in ("l2", "cosine"):
        shared = nearest_residuals(query, normal.reshape(-1, 6), [1, 2, 4], match)
        for k in (1, 2, 4):
            assert torch.equal(shared[k], nearest_residual(query, normal[:k].reshape(-1, 6), match)), (match, k)
    # the nearest of 4 references is found, not the nearest of the first one
    l2 = nearest_residuals(query, normal.reshape(-1, 6), [4], "l2")[4]
    brute = torch.cdist(query.reshape(-1, 6), normal.reshape(-1, 6)).argmin(dim=1)
    assert torch.allclose(l2.reshape(-1, 6), query.reshape(-1, 6) - normal.reshape(-1, 6)[brute], atol=1e-6)
    method = small_method()
    perturbed(method.head)
    queries, references = level_features(5, 1), level_features(4, 2)
    sides = method.normal_side(queries, references, [1, 2, 4])
    for k in (1, 2, 4):
        alone = method.score(queries, {n: f[:k] for n, f in references.items()})
        together = method.score(queries, {n: f[:k] for n, f in references.items()}, normal_side=sides[k])
        assert torch.equal(together, alone), k


def test_a_batch_scores_as_its_items_one_by_one():
    method = small_method()
    perturbed(method.head)
    queries, normal = level_features(5, 1), level_features(3, 2)
    together = method.score(queries, normal, chunk=4)
    alone = torch.cat([method.score({n: t[i:i + 1] for n, t in queries.items()}, normal) for i in range(5)])
    assert together.shape == (5, 8, 8)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_an_odd_query_patch_scores_above_a_copy_of_a_reference():
    method = small_method()
    normal = level_features(2, 3)
    copy = {n: t[:1].clone() for n, t in normal.items()}
    odd = {n: t.clone() for n, t in copy.items()}
    odd["fine"][0, 27] += 25.0
    maps = method.score({n: torch.cat([copy[n], odd[n]]) for n in LEVELS}, normal)
    assert maps[1].max() > maps[0].max()
    row, col = divmod(int(maps[1].flatten().argmax()), 8)
    assert abs(row - 3) <= 1 and abs(col - 3) <= 1  # patch 27 = (3, 3), or a neighbour through the 3x3 conv


def test_the_image_score_is_the_max_of_the_pixel_map():
    method = small_method()
    pixel = torch.rand(3, 16, 16)
    assert torch.equal(method.image_scores(torch.rand(3, 8, 8), pixel), pixel.flatten(1).amax(dim=1))
    assert ResadMethod.image_scores_need_pixels and not ResadMethod.uses_abnormal_refs


def test_the_rotations_and_constants_survive_save_and_load(tmp_path):
    method = small_method(seed=5)
    perturbed(method.head)
    method.head.calibration.copy_(torch.tensor([-1.0, -2.0, -3.0]))
    method.save(tmp_path / "ckpt")
    restored = load_method(tmp_path / "ckpt")
    fresh = small_method()  # seed 0: other rotations
    for name, tensor in method.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    rotations = [k for k in method.state_dict() if k.endswith("rotation")]
    assert len(rotations) == 3 * SMALL["blocks"]
    assert not any(torch.equal(fresh.state_dict()[k], method.state_dict()[k]) for k in rotations)
    queries, normal = level_features(2, 7), level_features(2, 8)
    assert torch.equal(restored.score(queries, normal), method.score(queries, normal))


def test_a_checkpoint_refuses_a_grid_or_width_it_was_not_trained_for(tmp_path):
    small_method().save(tmp_path / "ckpt")
    restored = load_method(tmp_path / "ckpt")
    queries, normal = level_features(1, 1), level_features(1, 2)
    other_width = {**LEVELS, "mid": [4, 4, 11]}
    with pytest.raises(NaglError, match="mid.*width 10"):
        restored.score(level_features(1, 1, other_width), level_features(1, 2, other_width))
    other_grid = {**LEVELS, "coarse": [1, 4, 12]}
    with pytest.raises(NaglError, match="grid 1x4.*2x2"):
        restored.score(queries, normal, grid={n: tuple(v[:2]) for n, v in other_grid.items()})
    with pytest.raises(NaglError, match="lack the level"):
        restored.score({n: t for n, t in queries.items() if n != "coarse"}, normal)
    with pytest.raises(NaglError, match="does not fit"):
        ResadMethod(1, levels=other_width, **SMALL).load_state_dict(restored.state_dict())
    with pytest.raises(NaglError, match="k_normal >= 1"):
        restored.score(queries, {n: t[:0] for n, t in normal.items()})


def test_parameter_counts_on_wide_resnet50_and_effnet_lite0_shapes():
    with torch.device("meta"):  # built from shapes alone: no weights, no memory
        wrn = ResadMethod(1, levels={"layer1": [56, 56, 256], "layer2": [28, 28, 512], "layer3": [14, 14, 1024]})
        effnet = ResadMethod(1, levels={"stride4": [64, 64, 24], "stride8": [32, 32, 40], "stride16": [16, 16, 112]})
    assert wrn.parameter_counts() == (55_404_800, 55_404_800)
    assert effnet.parameter_counts() == (6_110_608, 6_110_608)
    flows = [sum(p.numel() for p in flow.parameters()) for flow in wrn.head.flows]
    assert flows == [4_930_560, 10_511_360, 27_571_200]
    assert effnet.levels == ["stride4", "stride8", "stride16"]


# -- training ---------------------------------------------------------------------------

def flow_weights(method: ResadMethod) -> list[torch.Tensor]:
    return [torch.cat([p.detach().flatten().clone() for p in flow.parameters()]) for flow in method.head.flows]


def test_every_level_flow_changes_in_one_training_step_even_below_one_chunk():
    method = small_method()
    batch = make_batch()
    assert all(len(batch) * h * w < method.config["chunk"] for h, w, _ in LEVELS.values())
    optimisers = method.configure_optimisers(schedule())
    before = flow_weights(method)
    constraintor = [p.detach().clone() for p in method.head.constraintors.parameters()]
    method.start_epoch(1, 10)
    loss = method.training_step(batch, optimisers)
    assert math.isfinite(loss)
    for level, (old, new) in enumerate(zip(before, flow_weights(method), strict=True)):
        assert not torch.equal(old, new), f"the flow of level {level} did not move"
    assert any(not torch.equal(a, b) for a, b in zip(constraintor, method.head.constraintors.parameters(), strict=True))


def test_chunks_keep_the_last_partial_one_and_each_step_moves_only_its_level(monkeypatch):
    method = small_method(chunk=20)
    batch = make_batch()
    optimisers = method.configure_optimisers(schedule())
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    original = method._log_likelihood

    def recording(level, vectors, positions):
        seen[level].append(vectors.shape[0])
        return original(level, vectors, positions)

    steps: list[int] = []
    flows = list(method.head.flows)
    for level, optimiser in enumerate(optimisers[1:]):
        def stepped(step=optimiser.step, level=level):
            others = [w for i, w in enumerate(flow_weights(method)) if i != level]
            step()
            assert all(torch.equal(a, b) for a, b in zip(others, [w for i, w in enumerate(flow_weights(method))
                                                               if i != level], strict=True))
            steps.append(level)
        monkeypatch.setattr(optimiser, "step", stepped)
    assert len(flows) == 3
    monkeypatch.setattr(method, "_log_likelihood", recording)
    method.start_epoch(1, 10)  # stage 1: normal vectors only in the ML loss
    method.training_step(batch, optimisers)
    for level, (h, w, _) in enumerate(LEVELS.values()):
        total = len(batch) * h * w
        assert sum(seen[level]) == total  # every vector once, the remainder included
        assert seen[level] == [20] * (total // 20) + ([total % 20] if total % 20 else [])
    assert steps == [0] * 7 + [1] * 2 + [2] * 1  # 128 -> 7 chunks, 32 -> 2, 8 -> 1


def test_the_profile_caps_the_flow_vectors_per_level_and_batch(monkeypatch):
    method = small_method()
    optimisers = method.configure_optimisers(schedule("smoke"))
    assert method.flow_vectors == 512
    method.flow_vectors = 16
    seen = []
    original = method._log_likelihood
    monkeypatch.setattr(method, "_log_likelihood", lambda level, v, p: seen.append(v.shape[0]) or original(level, v, p))
    method.training_step(make_batch(), optimisers)
    assert seen == [16, 16, 8]
    assert method.configure_optimisers(schedule("paper")) and method.flow_vectors is None


def test_stage_one_covers_the_first_tenth_of_the_epochs_and_bgspp_starts_in_stage_two():
    method = small_method()
    assert method.stage1_epochs(100) == 10 and method.stage1_epochs(10) == 1
    method.start_epoch(1, 10)
    assert method.stage == 1
    optimisers = method.configure_optimisers(schedule())
    method.training_step(make_batch(), optimisers)
    assert torch.equal(method.head.boundary, torch.zeros(3))  # no BG-SPP in stage 1
    method.start_epoch(2, 10)
    assert method.stage == 2
    method.training_step(make_batch(), optimisers)
    assert (method.head.boundary != 0).all()


def test_occ_loss_pulls_normal_residuals_in_and_keeps_abnormal_ones():
    from nagl.methods.resad import occ_loss

    output = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    residual = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    abnormal = torch.tensor([False, True])
    assert torch.allclose(occ_loss(output, residual, abnormal, "sqrt-norm"), torch.tensor(math.sqrt(6) - 1 + 0.5))
    assert torch.allclose(occ_loss(output, residual, abnormal, "pseudo-huber"), torch.tensor(math.sqrt(26) - 1 + 0.5))


def test_calibration_fixes_each_level_constant_at_the_max_normal_log_likelihood():
    method = small_method()
    perturbed(method.head)
    batch = make_batch()
    batch.masks[:] = False
    constants = method.calibrate([batch])["c_l"]
    with torch.no_grad():
        likelihoods = method._level_likelihoods(method._batch_residuals(batch))
    assert constants == pytest.approx([float(ll.max()) for ll in likelihoods], rel=1e-6)
    assert torch.allclose(method.head.calibration, torch.tensor(constants))
    # every level's normalised map peaks at exactly 1 on the calibration patches
    assert all(float(torch.exp(ll - c).max()) == pytest.approx(1.0, rel=1e-5)
               for ll, c in zip(likelihoods, constants, strict=True))


def test_whole_maps_without_positions_equal_explicit_positions():
    flow = perturbed(ConditionalFlow(4, condition=8, blocks=2))
    code, x = torch.randn(3, 8), torch.randn(6, 4)
    explicit = flow.log_likelihood(x, code, torch.arange(3).repeat(2))
    assert torch.allclose(flow.log_likelihood(x, code, None), explicit, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(flow.eval().log_likelihood(x, code, None), explicit, atol=1e-6)


# -- through the training loop, on a small prepared source ---------------------------------

SOURCES = """
datasets:
  rs-source:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick, gravel]
    counts: {train_good: 6, test_good: 2, test_anomalous: 4}
  rs-target:
    kind: embedded
    domain: industrial-object
    preset: objects
    categories: [coins]
    counts: {train_good: 2, test_good: 2, test_anomalous: 2}
"""


def test_training_never_uses_a_query_as_its_reference_and_fixes_c_on_the_source_only(project, monkeypatch):
    import sys

    from nagl.data.layout import read_manifest
    from nagl.data.prepare import dataset_path, prepare_dataset
    from nagl.models.backbones import backbone_shapes
    from nagl.training.loop import train_on_source

    project(SOURCES)
    for name in ("rs-source", "rs-target"):
        prepare_dataset(name, version=False)
    source, target = dataset_path("rs-source"), dataset_path("rs-target")
    manifest = read_manifest(source)
    shapes = backbone_shapes("effnet-lite0", 64)  # stride 4 / 8 / 16 grids 16 / 8 / 4
    names = shapes.level_groups["pyramid"]
    generator = torch.Generator().manual_seed(0)
    features = {sha: {n: torch.randn(shapes.levels[n][0][0] * shapes.levels[n][0][1], shapes.levels[n][1],
                                     generator=generator) for n in names} for sha in manifest["image_sha256"]}

    def level_lookup(shas, levels):
        return {n: torch.stack([features[s][n] for s in shas]) for n in levels}

    seen = {"steps": [], "calibration": []}
    step, calibrate = ResadMethod.training_step, ResadMethod.calibrate
    monkeypatch.setattr(ResadMethod, "training_step",
                        lambda self, batch, opt: seen["steps"].append(list(batch.episodes)) or step(self, batch, opt))
    monkeypatch.setattr(ResadMethod, "calibrate",
                        lambda self, batches: seen["calibration"].extend(batches) or calibrate(self, batches))
    opened = []
    watching = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if watching[0] and event == "open"
                     and isinstance(args[0], str | bytes | type(source)) and str(target) in str(args[0]) else None)
    try:
        result = train_on_source(source, lambda shas: torch.zeros(len(shas), 4, 1), backbone_identity="toy",
                                 method="resad", profile="smoke", seed=0, grid=(2, 2), extractor=shapes,
                                 level_lookup=level_lookup, method_settings={"blocks": 2, "pos_dim": 8},
                                 overrides={"epochs": 10, "episodes": 2, "batch": 2}, progress=False)
        assert opened == []  # no image, mask or file of the target dataset was opened (Python-level opens)
        (target / "manifest.parquet").read_bytes()
        assert opened  # the hook does see a read of the target
    finally:
        watching[0] = False
    method = result.method
    episodes = [e for batch in seen["steps"] for e in batch]
    assert len(episodes) == 20 and all(len(e.normal) == 4 and e.query not in e.normal for e in episodes)
    assert all(e.label == 0 for e in seen["steps"][0])  # stage 1: the first epoch is normal queries only
    calibration = [e for batch in seen["calibration"] for e in batch.episodes]
    source_rows = set(manifest.index[manifest["label"] == 0])
    assert calibration and all(e.label == 0 and e.query in source_rows and e.query not in e.normal
                               for e in calibration)
    with torch.no_grad():
        maxima = [max(float(ll.max()) for batch in seen["calibration"]
                      for ll in [method._level_likelihoods(method._batch_residuals(batch))[level]])
                  for level in range(3)]
    assert method.head.calibration.tolist() == pytest.approx(maxima, rel=1e-5)
    assert result.metadata["training"]["method"]["calibration_images"] == 256
