"""BatchAugment: exact normalisation, seeded randomness, each augmentation doing what it says, real cells, the grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from blastscan.data.images import load_rgb, resize_rgb
from blastscan.errors import ConfigError
from blastscan.imaging.augment import AugmentConfig, BatchAugment, augmentation_grid, save_augmentation_grid

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_T = torch.tensor(MEAN).view(1, 3, 1, 1)
STD_T = torch.tensor(STD).view(1, 3, 1, 1)
OFF = {
    "hflip": 0.0,
    "vflip": 0.0,
    "rot90": False,
    "rotation": 0.0,
    "zoom": (1.0, 1.0),
    "brightness": 0.0,
    "contrast": 0.0,
    "stain_jitter": 0.0,
}


def only(**changes: object) -> BatchAugment:
    """A BatchAugment with every augmentation off except `changes`."""
    return BatchAugment(AugmentConfig(**{**OFF, **changes}), MEAN, STD)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=seeded(seed))


def reference(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN_T) / STD_T


def smear_like(n: int = 4, size: int = 48, background: int = 225) -> torch.Tensor:
    """Pale glass (or black, background=0) with a dark purple 'cell' in the middle."""
    x = torch.full((n, 3, size, size), background, dtype=torch.uint8)
    lo, hi = size // 3, 2 * size // 3
    x[:, 0, lo:hi, lo:hi], x[:, 1, lo:hi, lo:hi], x[:, 2, lo:hi, lo:hi] = 110, 60, 150
    return x


def test_eval_is_exact_normalisation() -> None:
    x = random_batch()
    augment = BatchAugment(AugmentConfig(), MEAN, STD)
    out = augment(x, seeded(0), train=False)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, reference(x))
    disabled = BatchAugment(AugmentConfig(enabled=False), MEAN, STD)
    assert torch.equal(disabled(x, seeded(0), train=True), reference(x))
    assert torch.allclose(augment.unnormalize(out), x.float() / 255, atol=1e-6)


def test_identity_when_everything_is_off() -> None:
    x = random_batch()
    assert torch.equal(only()(x, seeded(0)), reference(x))


def test_same_seed_same_output_and_seeds_differ() -> None:
    x = smear_like(n=6)
    augment = BatchAugment(AugmentConfig(), MEAN, STD)
    first, again = augment(x, seeded(7)), augment(x, seeded(7))
    assert torch.equal(first, again)
    assert not torch.equal(first, augment(x, seeded(8)))
    # Images in one batch get their own draws.
    assert not torch.equal(first[0], first[1])
    # A generator's state continues: the next batch differs, and resuming from a saved state repeats it.
    generator = seeded(3)
    augment(x, generator)
    state = generator.get_state()
    second = augment(x, generator)
    assert torch.equal(second, augment(x, torch.Generator().set_state(state)))


def test_flips_are_flips() -> None:
    x = random_batch()
    assert torch.equal(only(hflip=1.0)(x, seeded(0)), reference(torch.flip(x, [3])))
    assert torch.equal(only(vflip=1.0)(x, seeded(0)), reference(torch.flip(x, [2])))
    x = random_batch(n=32)
    out = only(hflip=0.5)(x, seeded(1))
    flipped = [torch.equal(out[i], reference(torch.flip(x, [3]))[i]) for i in range(32)]
    kept = [torch.equal(out[i], reference(x)[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 4 < sum(flipped) < 28


def test_rot90_gives_quarter_turns() -> None:
    x = random_batch(n=32)
    out = only(rot90=True)(x, seeded(2))
    turns = []
    for i in range(32):
        matches = [k for k in range(4) if torch.equal(out[i : i + 1], reference(torch.rot90(x[i : i + 1], k, (2, 3))))]
        assert len(matches) == 1, f"image {i} is not a quarter turn of its input"
        turns.append(matches[0])
    assert set(turns) == {0, 1, 2, 3}


def test_non_square_images_keep_their_shape() -> None:
    x = torch.randint(0, 256, (4, 3, 20, 30), dtype=torch.uint8, generator=seeded(0))
    for augment in (only(rot90=True, hflip=0.5), BatchAugment(AugmentConfig(), MEAN, STD)):
        out = augment(x, seeded(0))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_rotation_is_rigid_on_non_square_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 90-degree turn of a 100 x 60 image makes a 30-pixel horizontal bar a 30-pixel vertical one."""
    image = torch.full((1, 3, 60, 100), 255, dtype=torch.uint8)
    image[:, :, 29:31, 35:65] = 0
    augment = only(rotation=90.0)
    # Every uniform draw at its top: no flips, rotation by +90 degrees.
    monkeypatch.setattr(torch, "rand", lambda size, **_: torch.ones(size, dtype=torch.float64))
    dark = (augment.unnormalize(augment(image))[0, 0] < 0.5).nonzero()
    rows, cols = dark[:, 0], dark[:, 1]
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (15, 44, 49, 50)


def test_resampling_path_agrees_with_exact_pixel_moves() -> None:
    """Flips and quarter turns folded into the grid_sample matrix give the same images as the exact path."""
    x = random_batch(n=16)
    exact = only(hflip=0.5, vflip=0.5, rot90=True)(x, seeded(4))
    resampled = only(hflip=0.5, vflip=0.5, rot90=True, zoom=(1.0, 1.0 + 1e-7))(x, seeded(4))
    assert torch.allclose(exact, resampled, atol=1e-4)


def test_rotation_fills_with_the_background_colour() -> None:
    pale, black = smear_like(background=225), smear_like(background=0)
    augment = only(rotation=45.0, zoom=(0.6, 0.6))
    for x, colour in ((pale, 225 / 255), (black, 0.0)):
        out = augment.unnormalize(augment(x, seeded(5)))
        corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert torch.allclose(corners, torch.full_like(corners, colour), atol=1e-5)
    # Red cells covering most of the border do not darken the fill: glass is the ring's bright colour.
    crowded = smear_like(background=225)
    crowded[:, 0, :, :30], crowded[:, 1, :, :30], crowded[:, 2, :, :30] = 200, 120, 130
    out = augment.unnormalize(augment(crowded, seeded(5)))
    assert torch.allclose(out[:, :, 0, -1], torch.full((4, 3), 225 / 255), atol=1e-5)
    # The cell is still there, smaller: the dark colour survives in the middle.
    out = augment.unnormalize(augment(pale, seeded(5)))
    assert torch.allclose(out[:, :, 24, 24], torch.tensor([110, 60, 150]) / 255, atol=1e-5)


def test_output_stays_within_the_normalised_unit_range() -> None:
    config = AugmentConfig(brightness=1.0, contrast=0.9, stain_jitter=0.5, rotation=180.0, zoom=(0.5, 2.0))
    augment = BatchAugment(config, MEAN, STD)
    out = augment(torch.cat([random_batch(), smear_like(n=8, size=32)]), seeded(6))
    low, high = -MEAN_T / STD_T, (1 - MEAN_T) / STD_T
    assert torch.isfinite(out).all()
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    assert (out <= low + 1e-5).any() and (out >= high - 1e-5).any(), "strong brightness should reach both ends"


def test_stain_jitter_changes_the_cell_and_leaves_the_glass() -> None:
    x = smear_like(n=4, size=32)
    augment = only(stain_jitter=0.3)
    out = augment.unnormalize(augment(x, seeded(0)))
    assert torch.allclose(out[:, :, 0, 0], torch.full((4, 3), 225 / 255), atol=1e-5)
    assert not torch.allclose(out[:, :, 16, 16], torch.tensor([110, 60, 150]) / 255, atol=1e-3)


def test_bad_configs_are_refused() -> None:
    for bad in ({"zoom": (1.2, 0.8)}, {"zoom": (0.0, 1.0)}, {"hflip": 1.5}, {"vflip": -0.1}, {"rotation": -5.0}):
        with pytest.raises(ValidationError):
            AugmentConfig(**bad)
    with pytest.raises(ValidationError, match="extra"):
        AugmentConfig.model_validate({"hflip": 0.5, "flip": 0.5})
    with pytest.raises(ConfigError, match="augment config"):
        BatchAugment({"hflpi": 0.5}, MEAN, STD)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="std"):
        BatchAugment(AugmentConfig(), MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="mean"):
        BatchAugment(AugmentConfig(), (0.5, 0.5), STD)
    augment = BatchAugment(AugmentConfig(), MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        augment(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        augment(torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_augmentation_grid_shape_and_first_column() -> None:
    x = smear_like(n=3, size=40)
    augment = BatchAugment(AugmentConfig(), MEAN, STD)
    grid = augmentation_grid(x, augment, n_variants=4, seed=0)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 40 + 2 * 2, 5 * 40 + 4 * 2, 3)
    assert np.array_equal(grid[42:82, :40], x[1].permute(1, 2, 0).numpy())
    assert np.array_equal(grid, augmentation_grid(x, augment, n_variants=4, seed=0))
    assert augmentation_grid(x, augment, n_variants=0).shape == (3 * 40 + 4, 40, 3)


def _real_cells(allidb2_dir: Path, deepapl_dir: Path, size: int) -> torch.Tensor:
    allidb = sorted((allidb2_dir / "img").glob("Im*.tif"))
    deepapl = sorted((deepapl_dir / "Data" / "All" / "Patient_00").rglob("*.jpg"))
    if not allidb or not deepapl:
        pytest.skip("ALL-IDB2 or DeepAPL images not found")
    paths = [allidb[0], allidb[-1], deepapl[0], deepapl[-1]]
    cells = [resize_rgb(load_rgb(path), size) for path in paths]
    return torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).contiguous()


def test_real_cells(allidb2_dir: Path, deepapl_dir: Path, tmp_path: Path) -> None:
    x = _real_cells(allidb2_dir, deepapl_dir, size=96)
    augment = BatchAugment(AugmentConfig(), MEAN, STD)
    out = augment(x, seeded(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, augment(x, train=False))
    # Zoomed out, the new margin takes each image's own glass colour: pale, not black.
    zoomed = only(zoom=(0.7, 0.7), rotation=30.0)
    corners = zoomed.unnormalize(zoomed(x, seeded(0)))[:, :, 0, 0]
    assert (corners.mean(dim=1) > 0.5).all(), f"corner colours {corners.tolist()} are too dark for glass"
    path = save_augmentation_grid(tmp_path / "figures" / "augmentation.png", x, augment, n_variants=3)
    with Image.open(path) as image:
        assert image.size == (4 * 96 + 3 * 2, 4 * 96 + 3 * 2) and image.mode == "RGB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator() -> None:
    x = smear_like(n=4, size=48)
    augment = BatchAugment(AugmentConfig(), MEAN, STD)
    on_cpu = augment(x, seeded(0))
    augment_cuda = augment.to("cuda")
    on_cuda = augment_cuda(x.cuda(), seeded(0))
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cpu, on_cuda.cpu(), atol=1e-3)
    cuda_generator = torch.Generator(device="cuda").manual_seed(0)
    assert torch.isfinite(augment_cuda(x.cuda(), cuda_generator)).all()
