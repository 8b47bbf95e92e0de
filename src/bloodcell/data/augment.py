"""Training augmentation with torchvision transforms v2 on uint8 tensors.

Each transform is switchable and has its strength in :class:`AugmentConfig`.
Besides the usual geometry and colour jitter, it models the acquisition
shifts labs see: stain colour shift, defocus blur, pixelation, JPEG artefacts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torchvision.transforms import v2


class AugmentConfig(BaseModel):
    enabled: bool = True
    flips: bool = True
    rot90: bool = True
    rotation_degrees: float = Field(0.0, ge=0, le=180, description="free rotation range; 0 disables")
    zoom_scale: tuple[float, float] | None = Field((0.75, 1.0), description="random resized crop area range")
    brightness: float = Field(0.15, ge=0)
    contrast: float = Field(0.15, ge=0)
    saturation: float = Field(0.15, ge=0)
    hue: float = Field(0.0, ge=0, le=0.5, description="hue jitter; costly on CPU (2.5x slower augmentation)")
    hue_p: float = Field(1.0, ge=0, le=1, description="probability of the hue jitter (1: part of the colour jitter, every image)")
    stain_shift: float = Field(0.08, ge=0, description="max per-channel gain change (stain colour)")
    stain_matrix: float = Field(0.0, ge=0, le=1, description="random stain matrices: spread of a random mixing of optical densities; 0 disables")
    stain_matrix_p: float = Field(0.8, ge=0, le=1, description="probability of a random stain matrix")
    illuminant: float = Field(0.0, ge=0, le=0.5, description="max per-channel gain of the background light (yellow or blue lamps); 0 disables")
    grayscale_p: float = Field(0.0, ge=0, le=1, description="probability of a grey image (shape cues only)")
    magnify_p: float = Field(0.0, ge=0, le=1, description="probability of a centred zoom: the whole cell larger in the frame")
    magnify_side: tuple[float, float] = Field((0.5, 0.9), description="side of the centred crop, as a fraction of the image's")
    shrink_p: float = Field(0.0, ge=0, le=1, description="probability of a shrunk image in a frame of its border colour: "
                            "what a padded framing (framing.pad) shows of a tight crop, on cells of every class")
    shrink_side: tuple[float, float] = Field((0.55, 0.95), description="side of the shrunk image, as a fraction of the frame's")
    blur_p: float = Field(0.15, ge=0, le=1, description="defocus: Gaussian blur probability")
    blur_sigma: tuple[float, float] = (0.3, 2.0)
    pixelate_p: float = Field(0.1, ge=0, le=1)
    jpeg_p: float = Field(0.1, ge=0, le=1)
    jpeg_quality: tuple[int, int] = (30, 95)
    erase_p: float = Field(0.0, ge=0, le=1, description="probability of a bright erased patch (occlusions, bubbles)")
    occlude_p: float = Field(0.0, ge=0, le=1, description="probability of translucent occluders: bubbles, dust, smudges")
    occlude_count: int = Field(4, ge=1, le=10, description="at most this many occluders per image")
    augmix_p: float = Field(0.0, ge=0, le=1, description="probability of AugMix (Hendrycks et al. 2020): a blend of random op chains")
    augmix_severity: int = Field(3, ge=1, le=10)
    foreign_style: Path | None = Field(
        None, description="a folder of unlabelled cell images from other labs: their Fourier amplitudes are mixed into "
        "training images (FACT, Xu et al. 2021), their phases (the cell's shapes) are not used; none disables")
    foreign_style_p: float = Field(0.5, ge=0, le=1, description="probability of an amplitude mix")
    foreign_style_ratio: float = Field(0.8, gt=0, le=1, description="the donor's share of the amplitude is drawn from U(0, ratio)")


class StainShift(torch.nn.Module):
    """Multiply each channel by its own random gain: a different stain batch or lamp."""

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gain = 1 + (torch.rand(3, 1, 1) * 2 - 1) * self.strength
        return (image.float() * gain).clamp_(0, 255).to(image.dtype)


class StainMatrix(torch.nn.Module):
    """A random stain: mix the image's optical densities with a random matrix near the identity.

    Beer-Lambert: a stained pixel's optical density OD = -log(I / I0) is the sum of each dye's
    density times its colour vector. Multiplying OD by a random matrix (identity plus Gaussian
    noise of spread ``strength``, and a random overall dye strength) moves every dye's colour and
    amount at once: HED jitter and stain-vector swapping are special cases. The unstained
    background (OD near 0) stays where it is; the lamp is :class:`Illuminant`'s job.
    """

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        od = -torch.log((image.float() + 1) / 256)  # (3, H, W), >= 0
        mix = torch.eye(3) + self.strength * torch.randn(3, 3)
        mix = mix * (1 + self.strength * (torch.rand(()) * 2 - 1))  # darker or paler staining overall
        mixed = torch.einsum("ij,jhw->ihw", mix, od).clamp_(min=0)
        return (torch.exp(-mixed) * 256 - 1).clamp_(0, 255).round_().to(image.dtype)


class Illuminant(torch.nn.Module):
    """A lamp of another colour: multiply each channel by its own gain, brightest one kept near 1.

    Other labs' crops come on yellow (low blue), grey or blue-tinted backgrounds; gains of up to
    ``strength`` below 1 per channel model that, renormalised so the image is not simply darker.
    """

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gain = 1 - torch.rand(3) * self.strength
        gain = gain / gain.max() * (0.9 + 0.2 * torch.rand(()))
        return (image.float() * gain.view(3, 1, 1)).clamp_(0, 255).round_().to(image.dtype)


class RandomSide(torch.nn.Module):
    """A transform that draws a square's side, a fraction of the image's in ``side`` (low, high)."""

    def __init__(self, side: tuple[float, float]):
        super().__init__()
        self.side = side

    def draw(self, size: int) -> int:
        fraction = self.side[0] + float(torch.rand(())) * (self.side[1] - self.side[0])
        return max(int(round(size * fraction)), 8)


class Magnify(RandomSide):
    """Crop a square around the centre (where framing put the cell) and resize it back: a higher
    magnification, with the whole cell kept in view, as other labs' tight crops show it."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        crop = self.draw(size)
        slack = size - crop
        top = slack // 2 + int(torch.randint(-(slack // 8), slack // 8 + 1, ()))
        left = slack // 2 + int(torch.randint(-(slack // 8), slack // 8 + 1, ()))
        window = image[..., top : top + crop, left : left + crop]
        return v2.functional.resize(window, [size, size], antialias=True)


class Shrink(RandomSide):
    """The image shrunk and placed in a frame of its border's median colour: a lower magnification, as a padded
    framing (:class:`bloodcell.data.framing.FramingConfig` ``pad``) shows another lab's tight crops. Given to
    cells of every class, so that a padded frame tells the network nothing about the class."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        small = self.draw(size)
        edge = torch.cat([image[..., 0, :], image[..., -1, :], image[..., :, 0], image[..., :, -1]], dim=-1)
        fill = edge.float().median(dim=-1).values.round().to(image.dtype)
        out = fill[..., None, None].expand_as(image).clone()
        top, left = (int(torch.randint(0, size - small + 1, ())) for _ in range(2))
        out[..., top : top + small, left : left + small] = v2.functional.resize(image, [small, small], antialias=True)
        return out


class AmplitudeMix(torch.nn.Module):
    """Give an image another lab's look: mix its Fourier amplitude spectrum with a donor's.

    The amplitude of an image's spectrum carries its colours, contrast, lighting and sharpness;
    the phase carries where edges are: the cell itself. FACT (Xu et al., CVPR 2021) trains on
    ``ifft(((1 - l) |F(x)| + l |F(d)|) exp(i angle F(x)))`` with ``l ~ U(0, ratio)``, per
    channel, for donors ``d`` from other domains. Here the donors are other labs' unlabelled
    cells, framed like the training images; their labels are never needed.
    """

    def __init__(self, donors: torch.Tensor, ratio: float):
        super().__init__()
        if donors.ndim != 4 or donors.shape[1] != 3 or not len(donors):
            raise ValueError(f"donors must be a non-empty (N, 3, H, W) stack, got {tuple(donors.shape)}")
        self.donor_amplitudes = torch.fft.rfft2(donors.float()).abs()  # once: (N, 3, H, W//2+1)
        self.size = donors.shape[-2:]
        self.ratio = ratio

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] != self.size:  # progressive resizing: a smaller crop than the donors
            return image
        spectrum = torch.fft.rfft2(image.float())
        donor = self.donor_amplitudes[int(torch.randint(len(self.donor_amplitudes), ()))]
        share = float(torch.rand(())) * self.ratio
        amplitude = (1 - share) * spectrum.abs() + share * donor
        mixed = torch.fft.irfft2(torch.polar(amplitude, spectrum.angle()), s=self.size)
        return mixed.clamp_(0, 255).round_().to(image.dtype)


def load_donors(folder: Path, image_size: int, framing=None, limit: int = 2000) -> torch.Tensor:
    """Every readable image under ``folder`` (sorted, at most ``limit``), through the one preprocessing
    path (framing and resize), as a uint8 (N, 3, S, S) stack; unreadable files are skipped."""
    import numpy as np

    from ..core.errors import BloodcellError
    from .preprocess import preprocess_batch
    from .sources import IMAGE_EXTENSIONS, ImageReadError, decode_pil

    folder = Path(folder)
    if not folder.is_dir():
        raise BloodcellError(f"{folder}: foreign_style is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    images = []
    for path in paths:
        try:
            image = decode_pil(path)[0]
        except ImageReadError:
            pass  # a donor that cannot be read is just not a donor
        else:
            images.append(image)
    if not images:
        raise BloodcellError(f"{folder}: no readable images to take other labs' styles from")
    stack = preprocess_batch(images, image_size, framing)
    return torch.from_numpy(np.ascontiguousarray(stack)).permute(0, 3, 1, 2).contiguous()


class Rot90(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


class Pixelate(torch.nn.Module):
    """Down-sample by 2-4x and back with nearest neighbours: a low-resolution camera."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        factor = int(torch.randint(2, 5, ()))
        small = torch.nn.functional.interpolate(image[None].float(), size=max(size // factor, 1), mode="area")
        return torch.nn.functional.interpolate(small, size=size, mode="nearest")[0].round().to(image.dtype)


class Occlusions(torch.nn.Module):
    """Translucent soft-edged ellipses over the image: air bubbles, dust, smudges, debris.

    Unlike an opaque erased box, an occluder lets the cell show through: each one has a random
    size (5-25% of the side), aspect, angle and edge softness, a light (70%) or dark fill with a
    slight tint, an opacity of 20-70%, and in 60% of cases a darker or lighter rim of random
    width, as the refractive edge of a bubble or a dust particle has.
    """

    def __init__(self, max_count: int = 4):
        super().__init__()
        self.max_count = max_count

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        out = image.float()
        ys = torch.arange(height, dtype=torch.float32).view(height, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, width)
        for _ in range(int(torch.randint(1, self.max_count + 1, ()))):
            u = torch.rand(10)  # every random number of this occluder, drawn at once
            cx, cy = u[0] * width, u[1] * height
            radius = (0.05 + 0.2 * u[2]) * width
            aspect, angle = 0.7 + 0.6 * u[3], u[4] * torch.pi
            dx, dy = xs - cx, ys - cy
            along = (dx * angle.cos() + dy * angle.sin()) / radius
            across = (-dx * angle.sin() + dy * angle.cos()) / (radius * aspect)
            distance = torch.sqrt(along**2 + across**2)
            softness = 0.02 + 0.1 * u[5]
            cover = ((1 - distance) / softness).clamp(0, 1)
            level = 200 + 55 * u[6] if u[7] < 0.7 else 90 * u[6]
            fill = (level + 12 * torch.randn(3, 1, 1)).clamp(0, 255)
            alpha = 0.2 + 0.5 * u[8]
            out = out * (1 - alpha * cover) + fill * (alpha * cover)
            if u[9] < 0.6:
                rim_width = 0.04 + 0.12 * float(torch.rand(()))
                rim = (1 - (distance - 1).abs() / rim_width).clamp(0, 1)
                gain = 0.4 + 0.9 * float(torch.rand(()))  # <1 darkens the rim, >1 brightens it
                out = out * (1 + (gain - 1) * rim)
        return out.clamp_(0, 255).round_().to(image.dtype)


def build_transform(config: AugmentConfig, image_size: int, output_size: int | None = None,
                    donors: torch.Tensor | None = None) -> v2.Compose | None:
    """The per-image training transform (uint8 CHW in, uint8 CHW out), or None.

    ``output_size`` smaller than ``image_size`` (progressive resizing) shrinks the crop; the
    resize is antialiased, like the random resized crop's own. ``donors`` are the images that
    ``config.foreign_style`` names (:func:`load_donors`), loaded once per run by the caller."""
    output_size = output_size or image_size
    if not config.enabled:
        return v2.Resize(output_size, antialias=True) if output_size != image_size else None
    steps: list = []
    if config.magnify_p:
        steps.append(v2.RandomApply([Magnify(config.magnify_side)], p=config.magnify_p))
    if config.zoom_scale:
        steps.append(v2.RandomResizedCrop(output_size, scale=config.zoom_scale, ratio=(0.9, 1.1), antialias=True))
    elif output_size != image_size:
        steps.append(v2.Resize(output_size, antialias=True))
    if config.shrink_p:
        steps.append(v2.RandomApply([Shrink(config.shrink_side)], p=config.shrink_p))
    if config.flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if config.rot90:
        steps.append(Rot90())
    if config.rotation_degrees:
        steps.append(v2.RandomRotation(config.rotation_degrees))
    if config.foreign_style is not None:
        if donors is None:
            raise ValueError("augment.foreign_style is set: pass its images as donors (load_donors)")
        steps.append(v2.RandomApply([AmplitudeMix(donors, config.foreign_style_ratio)], p=config.foreign_style_p))
    hue_apart = config.hue and config.hue_p < 1  # a turn on some images only: the others keep the lab's hues
    if config.brightness or config.contrast or config.saturation or (config.hue and not hue_apart):
        steps.append(v2.ColorJitter(config.brightness, config.contrast, config.saturation, 0 if hue_apart else config.hue))
    if hue_apart:
        steps.append(v2.RandomApply([v2.ColorJitter(hue=config.hue)], p=config.hue_p))
    if config.stain_matrix:
        steps.append(v2.RandomApply([StainMatrix(config.stain_matrix)], p=config.stain_matrix_p))
    if config.stain_shift:
        steps.append(StainShift(config.stain_shift))
    if config.illuminant:
        steps.append(Illuminant(config.illuminant))
    if config.grayscale_p:
        steps.append(v2.RandomGrayscale(p=config.grayscale_p))
    if config.blur_p:
        steps.append(v2.RandomApply([v2.GaussianBlur(7, sigma=config.blur_sigma)], p=config.blur_p))
    if config.pixelate_p:
        steps.append(v2.RandomApply([Pixelate()], p=config.pixelate_p))
    if config.jpeg_p:
        steps.append(v2.RandomApply([v2.JPEG(config.jpeg_quality)], p=config.jpeg_p))
    if config.augmix_p:
        steps.append(v2.RandomApply([v2.AugMix(severity=config.augmix_severity)], p=config.augmix_p))
    if config.occlude_p:
        steps.append(v2.RandomApply([Occlusions(config.occlude_count)], p=config.occlude_p))
    if config.erase_p:
        steps.append(v2.RandomErasing(p=config.erase_p, scale=(0.02, 0.15), value=[220, 220, 220]))
    return v2.Compose(steps) if steps else None  # every switch off: no transform at all
