"""The real tier: tests on the released checkpoints and real clips, opt-in.

Tests marked ``real`` need files this machine may not have: the released checkpoints, the spaghetti clip from the
Hugging Face hub, the published conversions. They run when asked for and skip otherwise, saying how to enable them:

- ``--real``: fetch what is missing (checkpoints from their release locations, hub files through ``huggingface_hub``).
  This is the only way the suite reaches beyond loopback: it lifts the suite's network guard and hub offline mode.
- ``--checkpoint-dir DIR`` (or ``$TIMESFORMER_CHECKPOINT_DIR``): a folder of downloaded checkpoints under their
  released file names; the real tier runs offline on the variants found there (hub files from the hub cache).
- ``--require-real``: a real-tier test that cannot get its files fails instead of skipping (a CI job with network).
- ``--hub-parity``: also compare every converted tensor with the published conversion on the hub.
- ``--record-checksums`` / ``--checksums FILE``: pin what the real tier downloads in the checksums lock file.

Checkpoints come through :func:`timesformer_convert.download.fetch_variant`, the same function the CLI uses and the
loopback tests drive against servers on 127.0.0.1. The fixtures ``real_checkpoint(variant)``,
``real_converted(variant)``, ``spaghetti_frames``, ``spaghetti_clip(variant)`` and ``video_clip(variant)`` give a
checkpoint path, its conversion, the spaghetti clip's frames, and native-shape ``pixel_values`` of the spaghetti clip
and of the local real video.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from timesformer_convert.cache import build_once, cache_dir
from timesformer_convert.checksums import ChecksumLock, default_lock_path, digest_file
from timesformer_convert.download import CHECKPOINT_DIR_ENV, checkpoint_dir_from_env, fetch_variant
from timesformer_convert.errors import ClipError, DownloadError, IntegrityError
from timesformer_convert.labels import hub_label_file, read_label_file
from timesformer_convert.variants import VARIANTS

VIDEO_ENV = "TIMESFORMER_VIDEO"
DEFAULT_VIDEO = Path(__file__).resolve().parents[3] / "shared" / "clips" / "bigbuckbunny.mp4"
ENABLE_HINT = (
    "enable the real tier with --real (downloads the released checkpoints; needs network) or with --checkpoint-dir="
    f"DIR / ${CHECKPOINT_DIR_ENV} (a folder of downloaded checkpoints)"
)


def pytest_addoption(parser):
    group = parser.getgroup("real", "real tier: released checkpoints and real clips (opt-in)")
    group.addoption("--real", action="store_true", help="run the real tier, downloading what is missing (network)")
    group.addoption(
        "--checkpoint-dir",
        default=None,
        help=f"folder of downloaded original checkpoints; runs the real tier on them (default: ${CHECKPOINT_DIR_ENV})",
    )
    group.addoption(
        "--require-real", action="store_true", help="real-tier tests that cannot get their files fail, not skip"
    )
    group.addoption(
        "--hub-parity", action="store_true", help="compare every converted tensor with the hub's published conversion"
    )
    group.addoption(
        "--record-checksums", action="store_true", help="pin downloaded checkpoints in the checksums lock file"
    )
    group.addoption("--checksums", default=None, help="checksums lock file (default: the repository's checksums.json)")
    group.addoption(
        "--video-path",
        default=None,
        help=f"a real video for the preprocessing tests (default: ${VIDEO_ENV}, else {DEFAULT_VIDEO})",
    )


class RealTier:
    """What the real tier may use, and the one place that fetches and converts real checkpoints."""

    def __init__(self, config):
        self.download = bool(config.getoption("--real"))
        configured = config.getoption("--checkpoint-dir")
        self.checkpoint_dir = Path(configured) if configured else checkpoint_dir_from_env()
        self.enabled = self.download or self.checkpoint_dir is not None
        self.required = bool(config.getoption("--require-real"))
        self.hub_parity = bool(config.getoption("--hub-parity"))
        self.record = bool(config.getoption("--record-checksums"))
        checksums = config.getoption("--checksums")
        self.lock = ChecksumLock(Path(checksums) if checksums else default_lock_path())
        self._digests: dict[str, str] = {}

    def unavailable(self, reason: str):
        """Skip the current test, or fail it under ``--require-real``."""
        __tracebackhide__ = True
        if self.required:
            pytest.fail(f"--require-real: {reason}", pytrace=False)
        pytest.skip(reason)

    def checkpoint(self, name: str) -> Path:
        """The released checkpoint of variant ``name`` (checkpoint folder, cache, or downloaded with --real)."""
        __tracebackhide__ = True
        if not self.enabled:
            self.unavailable(f"real tier is off: {name} needs the released checkpoint; {ENABLE_HINT}")
        wrong = missing = None
        try:
            return fetch_variant(
                VARIANTS[name],
                checkpoint_dir=self.checkpoint_dir,
                download=self.download,
                lock=self.lock,
                record=self.record,
            )
        except IntegrityError as e:
            wrong = str(e)  # a file that differs from its pin is wrong, not missing
        except DownloadError as e:
            missing = str(e) if self.download else f"{e}; pass --real to download it (needs network)"
        # Outside the except blocks, so that pytest does not print the error twice, chained.
        if wrong is not None:
            pytest.fail(wrong, pytrace=False)
        self.unavailable(missing)

    def labels(self, name: str) -> dict[int, str]:
        """The label map of variant ``name`` from the hub dataset of label files (hub cache, or downloaded)."""
        __tracebackhide__ = True
        variant = VARIANTS[name]
        path = hub_label_file(variant, download=self.download)
        if path is None:
            self.unavailable(
                f"{variant.label_file} is not in the Hugging Face hub cache; pass --real to download it, or point "
                "HF_HOME at a cache that holds it"
            )
        return read_label_file(path, variant.num_labels)

    def converted(self, name: str) -> Path:
        """The conversion of :meth:`checkpoint`, with its label map, built once per checkpoint content and converter
        version."""
        import transformers

        from timesformer_convert.convert import CONVERTER_VERSION, convert_checkpoint

        source = self.checkpoint(name)
        labels = self.labels(name)
        if name not in self._digests:
            self._digests[name] = digest_file(source).sha256
        key = f"{self._digests[name][:16]}-c{CONVERTER_VERSION}-t{transformers.__version__}"
        target = cache_dir() / "real" / f"{name}-{key}"
        return build_once(
            target, lambda staging: convert_checkpoint(source, staging, variant=VARIANTS[name], id2label=labels)
        )


_TIER = pytest.StashKey[RealTier]()


def pytest_configure(config):
    config.stash[_TIER] = RealTier(config)


@pytest.fixture(scope="session")
def real_tier(request) -> RealTier:
    return request.config.stash[_TIER]


@pytest.fixture(scope="session")
def real_checkpoint(real_tier):
    """``real_checkpoint(variant)``: path of the released checkpoint; skips (fails with --require-real) without."""
    return real_tier.checkpoint


@pytest.fixture(scope="session")
def real_converted(real_tier):
    """``real_converted(variant)``: folder of the released checkpoint's conversion, cached across runs."""
    return real_tier.converted


@pytest.fixture(scope="session")
def spaghetti_frames(real_tier):
    """The frames of the spaghetti clip the reference logits were computed on, from the hub (cache)."""
    from timesformer_convert.hub import read_clip_array, spaghetti_clip_file

    if not real_tier.enabled:
        real_tier.unavailable(f"real tier is off: the spaghetti clip comes with it; {ENABLE_HINT}")
    try:
        return read_clip_array(spaghetti_clip_file(download=real_tier.download))
    except (DownloadError, ClipError) as e:
        missing = str(e)
    real_tier.unavailable(missing)  # outside the except block, so that pytest does not print the error twice


@pytest.fixture(scope="session")
def spaghetti_clip(spaghetti_frames):
    """``spaghetti_clip(variant)``: the spaghetti clip as ``pixel_values`` at the variant's native shape."""
    from timesformer_convert.video import native_pixel_values

    return lambda name: native_pixel_values(spaghetti_frames, VARIANTS[name])


def video_path(config) -> Path:
    configured = config.getoption("--video-path") or os.environ.get(VIDEO_ENV)
    return Path(configured) if configured else DEFAULT_VIDEO


@pytest.fixture(scope="session")
def real_video(request) -> Path:
    """Path of a real video file (``--video-path`` / ``$TIMESFORMER_VIDEO``); skips when it is absent."""
    path = video_path(request.config)
    if not path.is_file():
        pytest.skip(f"no video at {path}; pass --video-path=FILE or set {VIDEO_ENV} to a real video (mp4)")
    return path


@pytest.fixture(scope="session")
def video_clip(real_video):
    """``video_clip(variant)``: the real video as ``pixel_values`` at the variant's native shape."""
    from timesformer_convert.video import video_pixel_values

    cache: dict[tuple[int, int], object] = {}

    def clip(name: str):
        variant = VARIANTS[name]
        shape = (variant.num_frames, variant.image_size)
        if shape not in cache:
            cache[shape] = video_pixel_values(real_video, *shape)
        return cache[shape]

    return clip


def pytest_runtest_setup(item):
    tier = item.config.stash[_TIER]
    if item.get_closest_marker("real") is not None and not tier.enabled:
        tier.unavailable(f"real tier is off; {ENABLE_HINT}")
