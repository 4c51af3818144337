"""Small on-disk datasets that tests and examples build in a temporary folder.

`write_rs_dataset` mimics the remote-sensing instruction set (six sources laid out as in the RS
project, one image missing and one truncated JPEG); `distinct_image` draws pictures that no
near-duplicate check confuses with each other.
"""
from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

# source -> folder of its images inside the image folder (as in NWPU-RSICD-UAV-UCM-LR-DOTA-instructions)
RS_LAYOUT = {"RSICD": "RSICD/images", "NWPU": "NWPU/NWPU_images", "LR": "LR/Train", "DOTA": "DOTA/images",
             "UAV": "UAV", "UCM": "UCM/Images"}


def distinct_image(seed: int, size: int = 48) -> Image.Image:
    """A random block pattern: different seeds give pictures far apart in phash and colour."""
    rng = random.Random(seed)
    cells = 6
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    step = size / cells
    for row in range(cells):
        for col in range(cells):
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.rectangle([col * step, row * step, (col + 1) * step, (row + 1) * step], fill=colour)
    return image


def conversation(question: str, answer: str, image: bool = True) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}" if image else question}, {"from": "gpt", "value": answer}]


def write_rs_dataset(root: str) -> dict:
    """An RS-style LLaVA JSON under `root` (images in `root/imagenes`); returns what tests expect.

    13 samples: RSICD 3 (two share one image), NWPU 2, LR 2, DOTA 2, UAV 2, UCM 2. The image of
    `nwpu-1` does not exist and the image of `dota-1` is a truncated JPEG.
    """
    image_folder = os.path.join(root, "imagenes")
    counts = {"RSICD": 2, "NWPU": 2, "LR": 2, "DOTA": 2, "UAV": 2, "UCM": 2}
    samples, seed = [], 0
    for source, n in counts.items():
        folder = RS_LAYOUT[source]
        os.makedirs(os.path.join(image_folder, folder), exist_ok=True)
        for i in range(n):
            seed += 1
            rel = f"{folder}/{source.lower()}_{i}.jpg"
            sid = f"{source.lower()}-{i}"
            if sid != "nwpu-1":
                distinct_image(seed, 64).save(os.path.join(image_folder, rel), quality=90)
            samples.append({"id": sid, "image": rel,
                            "conversations": conversation("Describe the image.", f"An aerial view number {seed}.")})
    # A second question on an RSICD image (same picture, two samples).
    samples.insert(1, {"id": "rsicd-0-q2", "image": samples[0]["image"],
                       "conversations": conversation("Is there a river?", "no")})
    corrupt = os.path.join(image_folder, RS_LAYOUT["DOTA"], "dota_1.jpg")
    with open(corrupt, "rb") as f:
        data = f.read()
    with open(corrupt, "wb") as f:
        f.write(data[: len(data) // 2])  # cut mid-scan: header parses, pixels do not
    data_path = os.path.join(root, "rs_instructions.json")
    with open(data_path, "w", encoding="utf-8") as f:
        json.dump(samples, f, indent=2)
    return {"data": data_path, "image_folder": image_folder, "num_samples": len(samples),
            "per_source": {"RSICD": 3, "NWPU": 2, "LR": 2, "DOTA": 2, "UAV": 2, "UCM": 2},
            "missing": "nwpu-1", "corrupt": "dota-1"}
