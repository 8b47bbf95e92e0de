"""Grad-CAM heat maps: which parts of the image drove the predicted class (Selvaraju et al. 2017)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch



def grad_cam(model: torch.nn.Module, image: np.ndarray, target: int | None = None) -> tuple[np.ndarray, int]:
    """(map in [0, 1] at the model's input size, class explained) for one preprocessed RGB uint8 image."""
    net = model.net
    x = model.normalise(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None])
    model.eval()
    with torch.enable_grad():
        if hasattr(net, "forward_features"):  # timm models: last feature map, then the head
            features = net.forward_features(x)
            features.retain_grad()
            logits = net.forward_head(features)
        else:  # the custom CNN
            features = net.blocks(x)
            features.retain_grad()
            logits = net.head(features)
        target = int(logits.argmax(1)) if target is None else target
        model.zero_grad(set_to_none=True)
        logits[0, target].backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max().clamp_min(1e-12)).numpy(), target


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    import matplotlib

    colours = matplotlib.colormaps["jet"](cam)[..., :3] * 255
    return (image * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def grad_cam_overlay(predictor, image: np.ndarray) -> str:
    """Base64 PNG of the heat map over the image, for the service."""
    from PIL import Image

    model = predictor.torch_model
    small = predictor.prepare(image)
    cam, _ = grad_cam(model, small)
    buffer = io.BytesIO()
    Image.fromarray(overlay(small, cam)).resize((224, 224), Image.Resampling.BICUBIC).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def stained_mask(image: np.ndarray) -> np.ndarray:
    """The dark, bluish pixels of a stained cell (nucleus and granules), as curation measures them."""
    rgb = image.astype(np.float32) / 255
    gray = rgb.mean(2)
    return (gray < gray.mean() - 0.1) & (rgb[..., 2] > rgb[..., 1])


def focus_on_cell(cam: np.ndarray, image: np.ndarray) -> bool:
    """Is the heat map's mean over the stained cell higher than over the rest of the image?"""
    mask = stained_mask(image)
    if not mask.any() or mask.all():
        return False
    return float(cam[mask].mean()) > float(cam[~mask].mean())
