"""Region-guided generation (Reg2RG): region inputs on known geometry, slots, the splice, targets and parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.models.regions import (
    REGION_NAMES,
    RegionBatch,
    RegionSettings,
    collate_regions,
    parse_region_report,
    region_block,
    region_target,
    splice_regions,
)
from rrg3d.preprocess.regions import bounding_box, geometry_mask, region_inputs, region_key, texture_crop

LABELS = {"1": "lung", "2": "heart", "3": "Bones", "4": "thyroid"}


def label_map() -> np.ndarray:
    labels = np.zeros((8, 16, 16), dtype=np.int32)
    labels[2:6, 4:12, 2:6] = 1  # lung: a 4 x 8 x 4 box
    labels[3:5, 6:10, 9:13] = 2  # heart: 2 x 4 x 4
    labels[0, 0, 0] = 3  # bone: a single voxel (below min_voxels)
    return labels  # thyroid: label 4 never painted


def test_names_are_matched_whole_and_aliases_merged():
    assert region_key("Trachea_and_Bronchie") == "trachea and bronchi"
    assert region_key(" Lungs ") == "lung"
    assert region_key("Tra. & Bro.") == "trachea and bronchi"
    assert region_key("heart") == "heart"


def test_crops_and_masks_on_known_geometry():
    labels = label_map()
    volume = torch.arange(8 * 16 * 16, dtype=torch.float32).reshape(1, 8, 16, 16)
    lung = labels == 1
    assert bounding_box(lung) == (slice(2, 6), slice(4, 12), slice(2, 6))
    crop = texture_crop(volume, lung, (4, 8, 4), air=-5.0)  # the box's own size: no resampling
    assert torch.equal(crop, volume[:, 2:6, 4:12, 2:6])
    heart = labels == 2  # a crop whose box holds voxels of another region: those become air
    partial = labels.copy()
    partial[3, 6, 9] = 0
    crop = texture_crop(volume, partial == 2, (2, 4, 4), air=-5.0)
    assert crop[0, 0, 0, 0] == -5.0 and crop[0, 1, 3, 3] == volume[0, 4, 9, 12]
    geometry = geometry_mask(heart, (4, 8, 8))  # nearest neighbour: still binary, same place at half size
    assert set(geometry.unique().tolist()) == {0.0, 1.0}
    assert geometry.shape == (1, 4, 8, 8)
    assert torch.equal(geometry[0].nonzero().min(0).values, torch.tensor([1, 3, 4]))


def test_empty_and_tiny_regions_are_dropped_and_recorded():
    volume = torch.rand(1, 8, 16, 16)
    inputs = region_inputs(volume, label_map(), LABELS, ["lung", "heart", "bone", "thyroid", "abdomen"],
                           texture_size=(4, 8, 8), geometry_size=(4, 8, 8), air=0.0, min_voxels=2)
    assert inputs.names == ["lung", "heart"] and inputs.label_ids == [1, 2]
    assert inputs.texture.shape == (2, 1, 4, 8, 8) and inputs.geometry.shape == (2, 1, 4, 8, 8)
    assert inputs.dropped == {"bone": "1 voxels (< 2)", "thyroid": "empty mask",
                              "abdomen": "not in the label map's labels"}
    none = region_inputs(volume, np.zeros((8, 16, 16), np.int32), LABELS, ["lung"], texture_size=(4, 8, 8),
                         geometry_size=None, air=0.0)
    assert none.names == [] and none.texture.shape == (0, 1, 4, 8, 8) and none.geometry is None
    with pytest.raises(RRG3DError, match="differs from the volume"):
        region_inputs(volume, np.zeros((4, 16, 16), np.int32), LABELS, ["lung"], texture_size=None,
                      geometry_size=None, air=0.0)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="each region once"):
        RegionSettings(names=("lung", "Lungs"))
    with pytest.raises(ConfigError, match="texture_encoder"):
        RegionSettings(texture_encoder="other")
    for switches in ({"geometry": False}, {"alignment": False}):
        with pytest.raises(ConfigError, match=r"recognizer .* needs geometry: true and alignment: true"):
            RegionSettings(recognizer=True, **switches)
    assert RegionSettings().names == REGION_NAMES


def batch_of(names: list[list[str]]) -> RegionBatch:
    items = []
    for k, regions in enumerate(names):
        n = len(regions)
        items.append({"names": regions, "label_ids": list(range(1, n + 1)),
                      "texture": torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1, 1) + 10 * k,
                      "geometry": None, "dropped": {}, "reports": {r: f"{r} text." for r in regions}})
    return collate_regions(items)


def test_shuffling_is_deterministic_per_seed_and_moves_inputs_with_names():
    batch = batch_of([["lung", "heart", "bone", "pleura"], ["heart", "thyroid"]])
    first = batch.shuffled(torch.Generator().manual_seed(3))
    again = batch.shuffled(torch.Generator().manual_seed(3))
    assert first.names == again.names and torch.equal(first.texture, again.texture)
    orders = {tuple(batch.shuffled(torch.Generator().manual_seed(s)).names[0]) for s in range(10)}
    assert len(orders) > 1
    for sample, offset in ((0, 0), (1, 4)):  # each texture still belongs to its region
        for slot, name in enumerate(first.names[sample]):
            original = batch.names[sample].index(name)
            assert first.texture[offset + slot] == batch.texture[offset + original]
    with pytest.raises(ValueError, match="permute"):
        batch.permuted([[0, 0, 1, 2], [0, 1]])


def test_splice_places_each_slot_and_checks_counts():
    ids = [7, 8, 9]  # <region_0..2>
    input_ids = torch.tensor([[1, 7, 7, 2, 8, 8, 3], [1, 7, 7, 2, 5, 5, 3]])
    embeds = torch.zeros(2, 7, 4)
    regions = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)  # sample 0: 2 slots, sample 1: 1
    out = splice_regions(embeds, input_ids, regions, [2, 1], ids)
    assert torch.equal(out[0, 1:3], regions[0]) and torch.equal(out[0, 4:6], regions[1])
    assert torch.equal(out[1, 1:3], regions[2]) and out[1, 4:6].abs().sum() == 0
    with pytest.raises(ValueError, match="expected 2"):
        splice_regions(embeds, torch.tensor([[1, 7, 2, 8, 8, 3, 3], [1, 7, 7, 2, 5, 5, 3]]), regions, [2, 1], ids)
    with pytest.raises(ValueError, match="out of order"):
        splice_regions(embeds, torch.tensor([[1, 8, 8, 2, 7, 7, 3], [1, 7, 7, 2, 5, 5, 3]]), regions, [2, 1], ids)


def test_targets_and_prompt_lines_follow_the_slots():
    settings = RegionSettings()
    reports = {"Lungs": "Clear lungs.", "heart": "Normal heart size.", "bone": "  "}
    target = region_target(["heart", "bone", "lung"], reports, settings)
    assert target == "The region 1 is heart: Normal heart size.\nThe region 3 is lung: Clear lungs."
    assert region_block(["heart", "lung"], settings) == "Region 1: <region_0>\nRegion 2: <region_1>"
    fixed = RegionSettings(alignment=False)
    assert region_target(["lung", "heart"], reports, fixed) == "Lung: Clear lungs.\nHeart: Normal heart size."
    assert region_block(["lung"], fixed) == "Region 1 (lung): <region_0>"
    assert region_block(["lung"], RegionSettings(texture=False, geometry=False)) == ""
    recognizing = RegionSettings(recognizer=True)
    assert region_block(["heart", "lung"], recognizing, ["heart", "pleura"]) == (
        "Region 1 (recognised: heart): <region_0>\nRegion 2 (recognised: pleura): <region_1>")
    with pytest.raises(ValueError, match="recognised name of every region slot"):
        region_block(["heart", "lung"], recognizing, ["heart"])
    with pytest.raises(ValueError, match="study x: none of its regions"):
        region_target(["thyroid"], reports, settings, where="study x")


def test_parsing_strips_prefixes_keeps_whole_names_and_grounds_by_slot():
    settings = RegionSettings()
    text = ("The region 1 is trachea and bronchi: The trachea is patent.\n"
            "The region 2 is lung: Emphysema.\nIt is mild.\nThe region 3 is the heart: Normal.\n"
            "The region 9 is bone: out of range slot text")
    parsed = parse_region_report(text, ["trachea and bronchi", "pleura", "heart"], settings)
    assert parsed.recognized == {"trachea and bronchi": "trachea and bronchi", "pleura": "lung", "heart": "heart"}
    # text follows the slot it was written for (the pleura's mask), whatever name the model gave it
    assert parsed.region_reports == {"trachea and bronchi": "The trachea is patent.",
                                     "pleura": "Emphysema. It is mild.", "heart": "Normal."}
    # merged in the model's region order, prefixes gone; a line for a slot that does not exist is grounded nowhere
    assert parsed.report == "out of range slot text The trachea is patent. Normal. Emphysema. It is mild."
    plain = parse_region_report("Trachea and bronchi: Patent.\nHeart: Normal.", ["heart", "trachea and bronchi"],
                                RegionSettings(alignment=False))
    assert plain.region_reports == {"trachea and bronchi": "Patent.", "heart": "Normal."}
    assert plain.report == "Patent. Normal."
    # told the names, a region written is a region recognised; one the model skipped is not
    assert plain.recognized == {"heart": "heart", "trachea and bronchi": "trachea and bronchi"}
    skipped = parse_region_report("Heart: Normal.", ["heart", "lung"], RegionSettings(alignment=False))
    assert skipped.recognized == {"heart": "heart", "lung": None}


def test_mask_descriptors_on_known_geometry():
    from rrg3d.models.regions import DESCRIPTOR_SIZE, mask_descriptors

    masks = torch.zeros(3, 1, 5, 9, 9)
    masks[0, 0, :, :, :] = 1  # the whole grid: centred, full box
    masks[1, 0, 0, 0, 8] = 1  # one voxel at (z=-1, y=-1, x=+1)
    found = mask_descriptors(masks)  # masks[2] empty
    assert found.shape == (3, DESCRIPTOR_SIZE)
    whole, voxel, empty = found
    assert whole[0] == pytest.approx(1.0) and torch.allclose(whole[1:4], torch.zeros(3), atol=1e-6)
    assert torch.allclose(whole[7:10], -torch.ones(3)) and torch.allclose(whole[10:13], torch.ones(3))
    assert torch.allclose(voxel[1:4], torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.allclose(voxel[4:7], torch.zeros(3)) and torch.allclose(voxel[7:10], voxel[10:13])
    assert empty[0] == pytest.approx(-1.0) and torch.count_nonzero(empty[1:]) == 0
    with pytest.raises(ValueError, match=r"\[N, 1, D, H, W\]"):
        mask_descriptors(torch.zeros(2, 5, 9, 9))


def test_geometry_descriptors_make_the_geometry_token_depend_on_where_the_mask_is():
    from rrg3d.models.regions import RegionTower

    settings = RegionSettings(texture=False, geometry_descriptors=True, geometry_size=(16, 32, 32),
                              geometry_encoder={"name": "vit3d", "in_channels": 1, "input_shape": [16, 32, 32],
                                                "patch_size": [8, 16, 16], "dim": 16, "depth": 1, "heads": 2,
                                                "pos_embed": "learned"})
    torch.manual_seed(0)
    tower = RegionTower(settings, shared_encoder_dim=8, lm_dim=12).eval()
    left, right = torch.zeros(1, 1, 16, 32, 32), torch.zeros(1, 1, 16, 32, 32)
    left[..., 4:12, 8:24, 2:10] = 1
    right[..., 4:12, 8:24, 22:30] = 1  # the same box, mirrored
    batch = RegionBatch(names=[["lung", "heart"]], label_ids=[[1, 2]], geometry=torch.cat([left, right]))
    tokens = tower(batch)
    assert tokens.shape == (2, 1, 12) and not torch.allclose(tokens[0], tokens[1], atol=1e-4)
    tower.set_trainable(encoder=False, compressor=False, projector=False)
    assert not any(p.requires_grad for p in tower.geometry_descriptor.parameters())


def test_the_recognition_head_learns_regions_from_their_masks():
    from rrg3d.models.regions import RegionTower

    names = ("lung", "heart", "bone")
    settings = RegionSettings(names=names, texture=False, geometry_descriptors=True, recognizer=True,
                              geometry_size=(8, 16, 16),
                              geometry_encoder={"name": "vit3d", "in_channels": 1, "input_shape": [8, 16, 16],
                                                "patch_size": [4, 8, 8], "dim": 16, "depth": 1, "heads": 2,
                                                "pos_embed": "learned"})
    torch.manual_seed(0)
    tower = RegionTower(settings, shared_encoder_dim=8, lm_dim=12)
    generator = torch.Generator().manual_seed(1)

    def study() -> dict:
        masks = torch.zeros(3, 1, 8, 16, 16)
        shift = int(torch.randint(0, 3, (1,), generator=generator))
        masks[0, 0, 1:7, 2:14, 1 + shift:7 + shift] = 1  # lung: large, on the right
        masks[1, 0, 3:6, 6:10, 8 + shift:11 + shift] = 1  # heart: small, central
        masks[2, 0, :, 13:16, 4:12] = 1  # bone: a posterior slab
        return {"names": list(names), "label_ids": [1, 2, 3], "texture": None, "geometry": masks, "dropped": {},
                "reports": None}

    batch = collate_regions([study() for _ in range(4)])
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-2)
    first = float(tower.recognition_loss(batch).detach())
    for _ in range(40):
        optimizer.zero_grad()
        tower.recognition_loss(batch).backward()
        optimizer.step()
    assert float(tower.recognition_loss(batch).detach()) < first / 10
    shuffled = batch.shuffled(torch.Generator().manual_seed(3))
    assert tower.recognize(shuffled) == shuffled.names  # the names follow the masks, not the slot order
    with pytest.raises(ValueError, match="not among the model's region names"):
        tower.recognition_loss(RegionBatch(names=[["thyroid"]], label_ids=[[1]], geometry=torch.zeros(1, 1, 8, 16, 16)))
