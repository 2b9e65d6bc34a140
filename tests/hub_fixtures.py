"""Local stand-ins for the Hub datasets of recipes/alive.yaml, written with ``datasets``.

Each reproduces the schema the real dataset's card and viewer show (column names, ClassLabel names
as the card gives them, row order, configs, or a loading script instead of data), at a few rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
from PIL import Image

ANIMALS10 = ["Butterfly", "Cat", "Chicken", "Cow", "Dog", "Elephant", "Horse", "Sheep", "Spider", "Squirrel"]
CASSAVA = ["Cassava Bacterial Blight (CBB)", "Cassava Brown Streak Disease (CBSD)", "Cassava Green Mottle (CGM)",
           "Cassava Mosaic Disease (CMD)", "Healthy"]
DEEPWEEDS = ["Chinee apple", "Lantana", "Parkinsonia", "Parthenium", "Prickly acacia", "Rubber vine", "Siam weed",
             "Snake weed", "Negative"]
RICE = ["Bacterial Leaf Blight", "Brown Spot", "Insect"]


def jpeg(i: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def _card(root: Path, licence: str, configs: str = "") -> None:
    (root / "README.md").write_text(f"---\nlicense: {licence}\n{configs}---\n# fixture\n")


def _labeled(names: list[str], labels: list[int], extra: dict | None = None, start: int = 0) -> datasets.Dataset:
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    cols = {"image": [{"bytes": jpeg(start + i), "path": None} for i in range(len(labels))], "label": labels}
    for k, v in (extra or {}).items():
        feats[k] = datasets.Value("string")
        cols[k] = v
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def animals10(root: Path, per_class: int = 6) -> Path:
    """Rapidata/Animals-10: image + ClassLabel of 10 animals, rows sorted by class, two parquet files."""
    labels = [c for c in range(len(ANIMALS10)) for _ in range(per_class)]
    ds = _labeled(ANIMALS10, labels)
    (root / "data").mkdir(parents=True)
    half = len(labels) // 2
    ds.select(range(half)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(half, len(labels))).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    _card(root, "gpl-2.0")
    return root


def cassava(root: Path, per_class: int = 2) -> Path:
    """pufanyi/cassava-leaf-disease-classification: configs full/balanced, long ClassLabel names, image_id."""
    configs = ("configs:\n- config_name: full\n  data_files:\n  - split: train\n    path: full/train-*.parquet\n"
               "- config_name: balanced\n  data_files:\n  - split: train\n    path: balanced/train-*.parquet\n")
    labels = [c for c in range(len(CASSAVA)) for _ in range(per_class)]
    ds = _labeled(CASSAVA, labels, {"image_id": [f"{1000 + i}.jpg" for i in range(len(labels))]})
    for cfg in ("full", "balanced"):
        (root / cfg).mkdir(parents=True)
        ds.to_parquet(str(root / cfg / "train-00000-of-00001.parquet"))
    _card(root, "unknown", configs)
    return root


def cattle_ssfr(root: Path, n: int = 5) -> Path:
    """MachineLearningVisionRG/CattleSSFR: an image folder with no class folders, so an image column only."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"cow_{i:03d}.jpg").write_bytes(jpeg(100 + i))
    _card(root, "mit")
    return root


def script_only(root: Path) -> Path:
    """davanstrien/amazonian_fish_classifier_data: a loading script that downloads from figshare, no data files."""
    root.mkdir(parents=True)
    (root / "amazonian_fish_classifier_data.py").write_text(
        "import datasets\n_URL = 'https://figshare.com/ndownloader/files/0'\n"
        "class AmazonianFish(datasets.GeneratorBasedBuilder):\n    pass\n")
    _card(root, "cc0-1.0")
    return root


def rice(root: Path, per_class: int = 2) -> Path:
    """Project-AgML/rice_disease_classification_bangladesh: a raw and an augmented config (3x the rows)."""
    configs = ("configs:\n- config_name: raw\n  data_files:\n  - split: train\n    path: raw/*.parquet\n"
               "- config_name: augmented\n  data_files:\n  - split: train\n    path: augmented/*.parquet\n")
    labels = [c for c in range(len(RICE)) for _ in range(per_class)]
    (root / "raw").mkdir(parents=True)
    (root / "augmented").mkdir(parents=True)
    _labeled(RICE, labels).to_parquet(str(root / "raw" / "train.parquet"))
    _labeled(RICE, labels * 3, start=500).to_parquet(str(root / "augmented" / "train.parquet"))
    _card(root, "unknown", configs)
    return root


def deepweeds(root: Path, per_class: int = 2, negatives: int = 8) -> Path:
    """Project-AgML/DeepWeeds_classification (as a save_to_disk folder): label ClassLabel + species string,
    about half the rows in the 'Negative' class."""
    labels = [c for c in range(len(DEEPWEEDS) - 1) for _ in range(per_class)] + [len(DEEPWEEDS) - 1] * negatives
    _labeled(DEEPWEEDS, labels, {"species": [DEEPWEEDS[c] for c in labels]}).save_to_disk(str(root))
    return root
