"""The nine released fine-tuned TimeSformer variants and their native input shapes.

All nine are ViT-Base sized (hidden 768, 12 blocks, 12 heads, patch 16) with divided space-time attention. They differ
in frame count, crop size and label set. The frame count is the model's own: L on Something-Something-v2 was trained on
64 frames, not the 96 of the Kinetics L models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConversionError

LABEL_REPO = "huggingface/label-files"
HUB_ORGANIZATION = "facebook"

# The original training normalization (mean and std per channel, on frames scaled to [0, 1]).
ORIGINAL_MEAN = (0.45, 0.45, 0.45)
ORIGINAL_STD = (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class Variant:
    """One released checkpoint: its native input, label set, and where the original file lives."""

    name: str
    dataset: str
    num_frames: int
    image_size: int
    num_labels: int
    label_file: str
    original_file: str
    url: str
    reference_logits: tuple[float, ...] | None = None
    seed_url: str | None = None
    attention_type: str = "divided_space_time"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16

    @property
    def hub_id(self) -> str:
        """The published transformers conversion of this variant on the Hugging Face hub."""
        return f"{HUB_ORGANIZATION}/{self.name}"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def as_dict(self) -> dict:
        """Plain-data view, with the derived hub id, for JSON output."""
        data = asdict(self)
        data["reference_logits"] = list(self.reference_logits) if self.reference_logits else None
        data["hub_id"] = self.hub_id
        return data


def _dropbox(key: str, file: str) -> str:
    return f"https://www.dropbox.com/s/{key}/{file}?dl=0"


_K400 = ("Kinetics-400", 400, "kinetics400-id2label.json")
_K600 = ("Kinetics-600", 600, "kinetics600-id2label.json")
_SSV2 = ("Something-Something-v2", 174, "something-something-v2-id2label.json")


def _variant(name, labels, frames, size, file, key, reference=None, seed_url=None) -> Variant:
    dataset, num_labels, label_file = labels
    return Variant(
        name=name,
        dataset=dataset,
        num_frames=frames,
        image_size=size,
        num_labels=num_labels,
        label_file=label_file,
        original_file=file,
        url=_dropbox(key, file),
        reference_logits=reference,
        seed_url=seed_url,
    )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _variant(
            "timesformer-base-finetuned-k400",
            _K400,
            8,
            224,
            "TimeSformer_divST_8x32_224_K400.pyth",
            "g5t24we9gl5yk88",
            (-0.3016, -0.7713, -0.4205),
            "https://drive.google.com/u/1/uc?id=17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l&export=download",
        ),
        _variant(
            "timesformer-hr-finetuned-k400",
            _K400,
            16,
            448,
            "TimeSformer_divST_16x16_448_K400.pyth",
            "6f0x172lpqy3oxt",
            (-0.9617, -3.7311, -3.7708),
        ),
        _variant(
            "timesformer-large-finetuned-k400",
            _K400,
            96,
            224,
            "TimeSformer_divST_96x4_224_K400.pyth",
            "r1iuxahif3sgimo",
        ),
        _variant(
            "timesformer-base-finetuned-k600",
            _K600,
            8,
            224,
            "TimeSformer_divST_8x32_224_K600.pyth",
            "4h2qt41m2z3aqrb",
            (-0.7267, -0.7466, 3.2404),
        ),
        _variant(
            "timesformer-hr-finetuned-k600",
            _K600,
            16,
            448,
            "TimeSformer_divST_16x16_448_K600.pyth",
            "ft1e92g2vhvxecv",
            (2.5273, 0.7127, 1.8848),
        ),
        _variant(
            "timesformer-large-finetuned-k600",
            _K600,
            96,
            224,
            "TimeSformer_divST_96x4_224_K600.pyth",
            "857rx6xeclxfhdg",
        ),
        _variant(
            "timesformer-base-finetuned-ssv2",
            _SSV2,
            8,
            224,
            "TimeSformer_divST_8_224_SSv2.pyth",
            "tybhuml57y24wpm",
            (-0.9059, 0.6433, -3.1457),
        ),
        _variant(
            "timesformer-hr-finetuned-ssv2",
            _SSV2,
            16,
            448,
            "TimeSformer_divST_16_448_SSv2.pyth",
            "9t68uzk8w2fpfnv",
            (-3.6756, -0.7513, 0.7180),
        ),
        _variant(
            "timesformer-large-finetuned-ssv2",
            _SSV2,
            64,
            224,
            "TimeSformer_divST_64_224_SSv2.pyth",
            "3f1rm2al8mhprwa",
        ),
    )
}


def get_variant(name: str) -> Variant:
    """Return the variant called ``name``. Raises ConversionError listing the known names when there is none."""
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(VARIANTS)
        raise ConversionError(f"unknown variant {name!r}; choose one of: {known}") from None
