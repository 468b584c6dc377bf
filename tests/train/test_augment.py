"""Augmentation: shapes kept, translation moves the content, draws are fixed by (seed, phase, epoch, item)."""

from __future__ import annotations

import pytest
import torch

from rrg3d.errors import ConfigError
from rrg3d.train.augment import AugmentedDataset, AugmentSettings, augment_volume


def _volume() -> torch.Tensor:
    return torch.rand(1, 8, 12, 12, generator=torch.Generator().manual_seed(0))


def test_translation_only_moves_the_content_and_repeats_the_border() -> None:
    settings = AugmentSettings(enabled=True, shift=(0, 2, 0), scale=0.0, offset=0.0, noise=0.0)
    volume = _volume()
    for seed in range(20):
        out = augment_volume(volume, settings, torch.Generator().manual_seed(seed))
        assert out.shape == volume.shape
        shifts = [s for s in range(-2, 3) if torch.equal(out[:, :, 2:10], volume[:, :, 2 - s:10 - s])]
        assert len(shifts) == 1, seed
        s = shifts[0]
        if s > 0:  # the gap at the start repeats the first row
            assert torch.equal(out[:, :, :s], volume[:, :, :1].expand(-1, -1, s, -1))


def test_intensity_jitter_and_noise_stay_in_their_bounds() -> None:
    volume = torch.full((1, 4, 4, 4), 0.5)
    settings = AugmentSettings(enabled=True, shift=(0, 0, 0), scale=0.1, offset=0.05, noise=0.0)
    values = [augment_volume(volume, settings, torch.Generator().manual_seed(s)).unique() for s in range(50)]
    assert all(len(v) == 1 and 0.5 * 0.9 - 0.05 <= v.item() <= 0.5 * 1.1 + 0.05 for v in values)
    assert len({round(v.item(), 6) for v in values}) > 40
    noisy = augment_volume(volume, AugmentSettings(shift=(0, 0, 0), scale=0, offset=0, noise=0.01),
                           torch.Generator().manual_seed(0))
    assert 0.005 < float((noisy - volume).std()) < 0.02
    assert augment_volume(volume, AugmentSettings(prob=0.0), torch.Generator()) is volume


class _Items(torch.utils.data.Dataset):
    blank_images = False
    ids = ("a", "b")

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return {"id": self.ids[i], "volume": _volume(), "report": "r"}


def test_dataset_draws_depend_on_seed_phase_epoch_and_item_only() -> None:
    data = AugmentedDataset(_Items(), AugmentSettings(enabled=True), seed=3)
    first = data[0]["volume"]
    assert torch.equal(AugmentedDataset(_Items(), AugmentSettings(enabled=True), seed=3)[0]["volume"], first)
    assert not torch.equal(data[1]["volume"], first)
    data.set_epoch(0, 1)
    assert not torch.equal(data[0]["volume"], first)
    data.set_epoch(0, 0)
    assert torch.equal(data[0]["volume"], first)
    assert data.ids == ("a", "b") and len(data) == 2  # the wrapped dataset's attributes show through
    blank = _Items()
    blank.blank_images = True
    assert torch.equal(AugmentedDataset(blank, AugmentSettings(enabled=True))[0]["volume"], _volume())


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="shift"):
        AugmentSettings(shift=(1, 2))
    with pytest.raises(ConfigError, match="prob"):
        AugmentSettings(prob=2.0)
