"""The real tier's switches, from a pytest subprocess as a user or a CI job runs it.

Off by default with a skip that says how to enable it (tests/test_plain_run.py);
``--require-real`` makes that a failure; ``--checkpoint-dir`` runs it through ``fetch_variant`` on the files there. The
end-to-end run uses a folder holding a full-size synthetic checkpoint under the released file name, and a hub cache
holding a stand-in spaghetti clip: the real tier's own tests then pass on it, which they could not if the wiring
between options, fetching, conversion and clip were broken.
"""

import json

import numpy as np
import pytest

from tests.plugins.real import RealTier
from tests.running import Options, failure_section, run_pytest
from tests.test_hub import npy_bytes, populate_hub_cache
from timesformer_convert.cache import CACHE_ENV
from timesformer_convert.download import CHECKPOINT_DIR_ENV
from timesformer_convert.hub import HUB_CACHE_VARIABLES, SPAGHETTI_FILE, SPAGHETTI_REPO
from timesformer_convert.variants import LABEL_REPO, VARIANTS

SSV2 = VARIANTS["timesformer-base-finetuned-ssv2"]


def run_real_tier(tmp_path, *options, own_hub: bool = False):
    """The real tier's tests with ``options``, with a cache of their own, and a hub folder too if ``own_hub``."""
    env, drop = {CACHE_ENV: str(tmp_path / "cache")}, ()
    if own_hub:  # HF_HOME names the hub cache when the variables that come first are dropped
        env, drop = {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, HUB_CACHE_VARIABLES
    return run_pytest("tests/test_real.py", "-q", "-rfEs", *options, env=env, drop=drop)


@pytest.mark.parametrize(("required", "outcome"), [(False, pytest.skip.Exception), (True, pytest.fail.Exception)])
def test_require_real_turns_the_skips_into_failures(required, outcome, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_DIR_ENV, raising=False)
    options = {"real": False, "checkpoint_dir": None, "require_real": required, "hub_parity": False}
    tier = RealTier(Options(**options, record_checksums=False, checksums=None))

    with pytest.raises(outcome) as stopped:
        tier.checkpoint(SSV2.name)

    assert not tier.enabled
    assert str(stopped.value).startswith("--require-real: real tier is off" if required else "real tier is off")


def test_a_checkpoint_folder_without_the_file_is_reported_by_the_fetch(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    result = run_real_tier(
        tmp_path,
        "--checkpoint-dir",
        str(empty),
        "--require-real",
        "-k",
        "declared_variants_shape and base-finetuned-ssv2",
    )

    assert result.returncode == 1, result.stdout + result.stderr
    section = failure_section(result.stdout, f"test_the_checkpoint_has_the_declared_variants_shape[{SSV2.name}]")
    expected = f"--require-real: {SSV2.name}: {SSV2.original_file} is neither in {empty} nor in the cache"
    assert section.strip().startswith(expected), section
    assert "During handling" not in section, "the error is printed twice"
    assert "pass --real to download it" in result.stdout
    assert "skipped" not in result.stdout


@pytest.mark.slow
def test_the_real_tier_runs_end_to_end_on_a_checkpoint_folder(tmp_path, artifacts):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / SSV2.original_file).symlink_to(artifacts.checkpoint(SSV2.name))
    frames = np.random.default_rng(0).integers(0, 256, size=(16, 90, 160, 3), dtype=np.uint8)
    hub = tmp_path / "hf" / "hub"
    populate_hub_cache(hub, SPAGHETTI_REPO, {SPAGHETTI_FILE: npy_bytes(frames, tmp_path)}, "dataset")
    labels = json.dumps({str(index): f"action {index}" for index in range(SSV2.num_labels)}).encode()
    populate_hub_cache(hub, LABEL_REPO, {SSV2.label_file: labels}, "dataset")

    result = run_real_tier(
        tmp_path,
        "--checkpoint-dir",
        str(folder),
        "--require-real",
        "-k",
        "base-finetuned-ssv2 and (declared_variants_shape or key_coverage or spaghetti_clip_at_native_shape)",
        own_hub=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    (converted,) = [path for path in (tmp_path / "cache" / "real").iterdir() if path.is_dir()]
    assert json.loads((converted / "config.json").read_text())["id2label"]["173"] == "action 173"
