"""Seeded data augmentation of prepared images (2, X, Y, Z), as CineMA's classification fine-tuning
does it.

CineMA (cinema/classification/dataset.py, ``get_image_transforms``; ranges from
cinema/classification/{acdc,mnms,mnms2}/config.yaml) composes, on the training images only:

1. a random gamma in [0.5, 1.5] (MONAI ``RandAdjustContrastd``, probability 0.5): the image is
   min-max normalised, raised to gamma and mapped back to its range;
2. Gaussian noise (MONAI ``RandGaussianNoised``, probability 0.5, mean 0, std drawn in [0, 0.1]);
3. a min-max rescale to [0, 1] (``ScaleIntensityd``, always);
4. a random affine (MONAI ``RandAffined``, probability 0.5, bilinear, zero padding): rotation about
   z (``rotate_range [0, 0, 180]`` degrees, i.e. an angle in [-180, 180]), translation up to 60
   voxels in x and y (0 in z) and a scale factor 1 + [-0.2, 0.2]. MONAI reads CineMA's scalar
   ``scale_range: 0.2`` as the range of the *first* axis only (the others are padded with 1),
   so the stretch is along x before rotation; we do the same.

Scale of the intensity steps: CineMA stores its images as uint8 (cinema/data/sitk.py,
``cast_to_uint8``) and hands those 0..255 values to steps 1 and 2, before the rescale of step 3.
Its noise therefore has a std of at most 0.1 *on a 0..255 scale*, 0.1 / 255 of the image's range.
cmrfed's model input is the same uint8 image rescaled to [0, 1], so the intensity steps first map
it back onto CineMA's scale (``AugmentSpec.intensity_scale`` = 255); adding std 0.1 to the [0, 1]
input, as cmrfed once did, is 255 times too strong. The gamma step is scale-free (it normalises
first), so only the noise depends on this.

CineMA's translation is in voxels of its 192-voxel, 1 mm grid; cmrfed prepares other grids too
(e.g. 64 voxels of 2 mm in the demo), so it is expressed here as a fraction of the in-plane size,
60 / 192, which is CineMA's own translation at the default ``prepare`` geometry.

Every random number comes from the ``torch.Generator`` passed in, drawn in a fixed order and count
whatever is applied, so one seed gives one view. The same transform (and the same gamma) applies
to both channels (ED and ES) of a subject: they are one acquisition.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cmrfed.errors import UsageError
from cmrfed.seeding import derive_seed

AUGMENT_CHOICES = ("none", "cinema")
_GAMMA_EPS = 1e-7  # MONAI AdjustContrast's epsilon


@dataclass(frozen=True)
class AugmentSpec:
    """One augmentation recipe: probabilities and ranges (CineMA's by default)."""

    name: str = "cinema"
    prob: float = 0.5
    rotate_deg: float = 180.0
    translate_frac: float = 60.0 / 192.0
    scale: float = 0.2
    gamma: tuple[float, float] = (0.5, 1.5)
    noise_std: float = 0.1
    intensity_scale: float = 255.0  # the value range the gamma and noise see (CineMA: uint8)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gamma"] = list(self.gamma)
        return out


def augment_spec(name: str) -> AugmentSpec | None:
    """``--augment`` value -> its recipe (None for ``none``)."""
    if name not in AUGMENT_CHOICES:
        raise UsageError(f"unknown --augment {name!r}; choose one of {', '.join(AUGMENT_CHOICES)}")
    return AugmentSpec() if name == "cinema" else None


def subject_view_seed(seed: int, client: str, subject_id: str, view: int) -> int:
    """The seed of view ``view`` of one subject: a function of the augmentation seed, the client,
    the subject and the view index only (not of its position in a split, the run seed or the
    method), so every run of a study can share the cached views."""
    digest = hashlib.sha256(f"{client}/{subject_id}".encode()).digest()
    subject = int.from_bytes(digest[:8], "little") >> 1
    return derive_seed(seed, subject, view)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def adjust_gamma(image: torch.Tensor, gamma: float) -> torch.Tensor:
    """MONAI's contrast adjustment: normalise to [0, 1], raise to ``gamma``, map back."""
    low = image.min()
    span = image.max() - low
    return ((image - low) / (span + _GAMMA_EPS)) ** gamma * span + low


def rescale(image: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] (a constant image becomes 0)."""
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else image - low


def affine_resample(image: torch.Tensor, angle_deg: float, shift: tuple[float, float],
                    scale_x: float) -> torch.Tensor:
    """Resample (C, X, Y, Z) under an in-plane affine about the volume centre, bilinear, zero
    padding; z is untouched (each slice maps onto itself).

    An output voxel at centred coordinates p (voxels) samples the input at R(-angle) (S p + t),
    with S = diag(scale_x, 1), t = ``shift``; this is MONAI's rotate @ translate @ scale order, and
    ``angle_deg`` is MONAI's z rotation (``Affine(rotate_params=(0, 0, radians(angle_deg)))``).
    An angle of -90 degrees equals ``np.rot90(image, 1, axes=(1, 2))`` on a square plane.
    """
    _, nx, ny, nz = image.shape
    theta = -math.radians(angle_deg)  # MONAI's sign: its angle turns the content the other way
    cos, sin = math.cos(theta), math.sin(theta)
    dtype = torch.float64
    px = torch.arange(nx, dtype=dtype) - (nx - 1) / 2
    py = torch.arange(ny, dtype=dtype) - (ny - 1) / 2
    gx, gy = torch.meshgrid(px, py, indexing="ij")
    sx, sy = gx * scale_x + shift[0], gy + shift[1]
    # np.rot90(axes=(0, 1)) gives out[i, j] = in[j, n - 1 - i]: input x = y_out, input y = -x_out
    in_x = cos * sx + sin * sy
    in_y = -sin * sx + cos * sy
    norm_x = in_x / max((nx - 1) / 2, 1e-12)
    norm_y = in_y / max((ny - 1) / 2, 1e-12)
    norm_z = torch.linspace(-1.0, 1.0, nz, dtype=dtype) if nz > 1 else torch.zeros(1, dtype=dtype)
    # grid_sample reads a 5-D input as (N, C, D, H, W) = (1, C, X, Y, Z); the grid's last axis
    # holds (w, h, d) = (z, y, x) coordinates
    grid = torch.stack(torch.broadcast_tensors(norm_z.view(1, 1, nz), norm_y.unsqueeze(-1),
                                               norm_x.unsqueeze(-1)), dim=-1)
    out = F.grid_sample(image.unsqueeze(0).to(torch.float32), grid.unsqueeze(0).to(torch.float32),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].to(image.dtype)


@dataclass(frozen=True)
class AugmentDraw:
    """Every random number of one view: which steps apply, and their parameters."""

    coins: tuple[bool, bool, bool]  # gamma, noise, affine applied
    gamma: float
    std: float  # noise std on the ``intensity_scale`` scale
    noise: torch.Tensor  # standard normal, the image's shape
    angle: float  # degrees
    shift: tuple[float, float]  # voxels
    scale_x: float


def draw_augment(shape: tuple[int, ...], generator: torch.Generator, spec: AugmentSpec) -> AugmentDraw:
    """The random numbers of one view of a (C, X, Y, Z) image, drawn from ``generator`` always in
    this order and always all of them: 3 apply-or-not coins, gamma, noise std, the noise field,
    angle, shift x, shift y, scale."""
    coins = torch.rand(3, generator=generator, dtype=torch.float64) < spec.prob
    gamma = _uniform(generator, *spec.gamma)
    std = _uniform(generator, 0.0, spec.noise_std)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    angle = _uniform(generator, -spec.rotate_deg, spec.rotate_deg)
    _, nx, ny, _ = shape
    shift = (_uniform(generator, -1, 1) * spec.translate_frac * nx,
             _uniform(generator, -1, 1) * spec.translate_frac * ny)
    scale_x = 1.0 + _uniform(generator, -spec.scale, spec.scale)
    return AugmentDraw((bool(coins[0]), bool(coins[1]), bool(coins[2])), gamma, std, noise, angle,
                       shift, scale_x)


def apply_augment(image: torch.Tensor, draw: AugmentDraw, spec: AugmentSpec) -> torch.Tensor:
    """CineMA's steps with the numbers of ``draw``: gamma and noise on the image mapped onto
    ``intensity_scale`` (CineMA's uint8 values), the rescale to [0, 1], the affine."""
    image = image.to(torch.float32) * spec.intensity_scale
    if draw.coins[0]:
        image = adjust_gamma(image, draw.gamma)
    if draw.coins[1]:
        image = image + draw.noise * draw.std
    image = rescale(image)
    if draw.coins[2]:
        image = affine_resample(image, draw.angle, draw.shift, draw.scale_x)
    return image


def augment_image(image: torch.Tensor, generator: torch.Generator, spec: AugmentSpec) -> torch.Tensor:
    """One random view of one subject's (C, X, Y, Z) image, drawn from ``generator``."""
    if image.ndim != 4:
        raise ValueError(f"expected one image (C, X, Y, Z), got shape {tuple(image.shape)}")
    return apply_augment(image, draw_augment(tuple(image.shape), generator, spec), spec)


def augment_batch(images: torch.Tensor, seeds: list[int], spec: AugmentSpec) -> torch.Tensor:
    """(B, C, X, Y, Z) -> one view per image, image b drawn from a generator seeded ``seeds[b]``."""
    return torch.stack([augment_image(img, torch.Generator().manual_seed(s), spec)
                        for img, s in zip(images, seeds, strict=True)])
