"""Albumentations presets used by remediation, from light to strong.

Each preset is built in code (read it here) and recorded with every augmented image as
albumentations' serialised form plus the seed, so `replay` reproduces the image bit for bit.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

PRESETS = ("light", "medium", "strong")  # escalation order


def preset(name: str):
    """The albumentations Compose for a preset name."""
    import albumentations as A

    reflect = 4  # cv2.BORDER_REFLECT_101: no black borders
    if name == "light":
        ops = [A.Affine(translate_percent=(-0.04, 0.04), scale=(0.95, 1.05), rotate=(-5, 5), border_mode=reflect, p=1.0),
               A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=1.0)]
    elif name == "medium":
        ops = [A.HorizontalFlip(p=0.5),
               A.Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-10, 10), border_mode=reflect, p=1.0),
               A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
               A.GaussNoise(std_range=(0.02, 0.05), p=0.5)]
    elif name == "strong":
        ops = [A.HorizontalFlip(p=0.5),
               A.Affine(translate_percent=(-0.12, 0.12), scale=(0.8, 1.2), rotate=(-20, 20), border_mode=reflect, p=1.0),
               A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=1.0),
               A.GaussNoise(std_range=(0.03, 0.08), p=1.0),
               A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.05, 0.15),
                               hole_width_range=(0.05, 0.15), p=0.5)]
    else:
        raise ValueError(f"augmentation preset {name!r} is not one of {PRESETS}")
    return A.Compose(ops, save_applied_params=True)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def apply(name: str, image: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """Augment `image` [H, W, C] uint8 with preset `name` and `seed`: (image, record).

    The record holds the preset, the seed, the serialised transform and the parameters it drew.
    """
    import albumentations as A

    compose = preset(name)
    compose.set_random_seed(seed)
    out = compose(image=image)
    record = {"preset": name, "seed": seed, "albumentations": A.__version__,
              "transform": A.to_dict(compose), "applied": _json_safe(out.get("applied_transforms", []))}
    return out["image"], record


def replay(record: dict | str, image: np.ndarray) -> np.ndarray:
    """Reproduce an augmentation from its record (dict or JSON), bit for bit."""
    import albumentations as A

    record = json.loads(record) if isinstance(record, str) else record
    compose = A.from_dict(record["transform"])
    compose.set_random_seed(record["seed"])
    return compose(image=image)["image"]
