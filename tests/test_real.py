"""The real tier: the released checkpoints, converted and run on real clips.

Opt-in (see tests/plugins/real.py): ``pytest --real`` downloads what is missing, ``--checkpoint-dir DIR`` runs on
checkpoints already downloaded, ``--require-real`` makes a missing file a failure, ``--hub-parity`` compares with the
published conversions. Checkpoints come through the same ``fetch_variant`` the loopback tests drive.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import VARIANT_NAMES
from timesformer_convert.checkpoint import read_state_dict
from timesformer_convert.config import check_variant, infer_shape
from timesformer_convert.convert import WEIGHTS_NAME, expected_tensors
from timesformer_convert.errors import VariantMismatchError
from timesformer_convert.inference import load_converted, original_logits
from timesformer_convert.variants import VARIANTS

pytestmark = [pytest.mark.real, pytest.mark.slow]

# The clip shows someone eating spaghetti, a class of both Kinetics-400 and Kinetics-600.
KINETICS_SPAGHETTI_LABEL = "eating spaghetti"
# The seed's reference logits were computed at 8 frames and 224 px: only variants of that native shape can be fed so.
SEED_PROTOCOL_VARIANTS = [
    name for name, v in VARIANTS.items() if v.reference_logits is not None and (v.num_frames, v.image_size) == (8, 224)
]


@pytest.fixture(params=VARIANT_NAMES)
def variant(request):
    return request.param


def test_the_checkpoint_has_the_declared_variants_shape(variant, real_checkpoint):
    path = real_checkpoint(variant)
    shape = infer_shape(read_state_dict(path), source=str(path))

    try:
        check_variant(shape, VARIANTS[variant], str(path))
    except VariantMismatchError as e:
        pytest.fail(str(e), pytrace=False)


def test_the_checkpoint_converts_with_complete_key_coverage(variant, real_converted):
    from transformers import TimesformerConfig

    folder = real_converted(variant)
    expected = expected_tensors(TimesformerConfig.from_pretrained(folder))

    with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
        written = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

    assert sorted(set(expected) - set(written)) == [], "missing keys"
    assert sorted(set(written) - set(expected)) == [], "unexpected keys"
    assert {k: s for k, s in written.items() if s != expected[k][0]} == {}, "shape mismatches"


@torch.no_grad()
def test_logits_on_the_spaghetti_clip_at_native_shape(variant, real_converted, spaghetti_clip):
    declared = VARIANTS[variant]
    model = load_converted(real_converted(variant))
    pixel_values = spaghetti_clip(variant)

    logits = original_logits(model, pixel_values)

    assert tuple(pixel_values.shape) == (1, declared.num_frames, 3, declared.image_size, declared.image_size)
    assert tuple(logits.shape) == (1, declared.num_labels) and torch.isfinite(logits).all()
    if declared.dataset.startswith("Kinetics"):
        top = model.config.id2label[int(logits.argmax(-1))]
        assert top == KINETICS_SPAGHETTI_LABEL, f"{variant}: top-1 is {top!r}"


@pytest.mark.parametrize("variant", SEED_PROTOCOL_VARIANTS)
@torch.no_grad()
def test_the_seeds_reference_logits_under_its_protocol(variant, real_converted, spaghetti_frames):
    from transformers import VideoMAEImageProcessorPil

    # The seed's protocol: the clip's first 8 frames, 224 px short side and crop, mean and std 0.5.
    processor = VideoMAEImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    pixel_values = processor(list(spaghetti_frames[:8]), return_tensors="pt")["pixel_values"]

    logits = load_converted(real_converted(variant))(pixel_values=pixel_values).logits

    expected = torch.tensor(VARIANTS[variant].reference_logits)
    assert torch.allclose(logits[0, :3], expected, atol=1e-4), f"{variant}: {logits[0, :3].tolist()} vs {expected}"


def test_every_converted_tensor_equals_the_published_conversion(variant, real_tier, real_converted):
    from timesformer_convert.errors import DownloadError
    from timesformer_convert.hub import hub_state_dict

    if not real_tier.hub_parity:
        pytest.skip("pass --hub-parity to compare with the published conversions on the Hugging Face hub")
    ours = load_file(real_converted(variant) / WEIGHTS_NAME)
    try:
        published = hub_state_dict(VARIANTS[variant], download=real_tier.download)
    except DownloadError as e:
        real_tier.unavailable(str(e))

    assert sorted(set(ours) - set(published)) == [], "keys the published conversion lacks"
    assert sorted(set(published) - set(ours)) == [], "keys only the published conversion has"
    different = sorted(key for key in ours if not torch.equal(ours[key], published[key].to(ours[key].dtype)))
    assert different == [], f"{len(different)} tensors differ from {VARIANTS[variant].hub_id}"


GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_API = ("golden_path", "load_record", "spaghetti_protocol", "protocol_pixel_values")


def _golden_module():
    try:
        from timesformer_convert import golden
    except ModuleNotFoundError as e:
        if e.name != "timesformer_convert.golden":
            raise
        pytest.skip("timesformer_convert.golden is not available: no golden store to compare with")
    missing = [name for name in GOLDEN_API if not hasattr(golden, name)]
    if missing:
        pytest.skip(f"timesformer_convert.golden has no {', '.join(missing)}: cannot read the real goldens")
    return golden


@torch.no_grad()
def test_spaghetti_logits_match_the_real_golden(variant, real_converted, spaghetti_frames):
    golden = _golden_module()
    path = golden.golden_path(GOLDEN_DIR, "real", variant)
    if not path.exists():
        pytest.skip(f"no real golden for {variant} at {path}")
    record = golden.load_record(path, variant, "real")
    if not record.verified:
        pytest.skip(f"{path} is not verified by a real run yet; its values are not a reference")

    pixel_values = golden.protocol_pixel_values(spaghetti_frames, golden.spaghetti_protocol(VARIANTS[variant]))
    logits = original_logits(load_converted(real_converted(variant)), pixel_values)[0]

    expected = torch.tensor(record.logits, dtype=logits.dtype)
    actual = logits[: len(expected)]
    assert torch.allclose(actual, expected, atol=record.tolerance, rtol=0), (
        f"{variant}: logits {actual.tolist()} differ from the golden {path} beyond {record.tolerance:g}: "
        f"{expected.tolist()}"
    )
