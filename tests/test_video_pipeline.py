"""Video latents end to end: MP4s -> prepare (tiny-video autoencoder) -> train -> GIF samples.

The test videos come from `video_files.write_video` (48x64, frame k with gray level
10 + 7k on top). The "tiny-video" CogVideoX autoencoder (random weights, /4 in space,
/4 in time) turns the centre clip of 5 frames at 16x16 into 2 x 4 x 4 x 4 latents.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import train_utils
from PIL import Image
from video_files import frame_content, write_video

from dfm_jax import data
from dfm_jax.evaluation import features, references
from dfm_jax.models import autoencoder
from dfm_jax.preparation import PrepareOptions
from dfm_jax.preparation import run as prepare
from dfm_jax.training import loop
from dfm_jax.utils import viz

FRAMES, RESOLUTION = 5, 16
VIDEO_CONFIG = {
    "data.source": "array_record",
    "data.channels": 4,
    "data.num_classes": 2,
    "data.frames": 2,
    "data.resolution": 4,
    "autoencoder.name": "tiny-video",
    "total_steps": 2,
    "checkpoint_every": 2,
    "sample_every": 2,
}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 2 videos of 13..16 frames, a corrupt file and a 3-frame video."""
    root = tmp_path_factory.mktemp("videos")
    for label in ("run", "jump"):
        for i in range(2):
            write_video(root / label / f"v{i}.mp4", 13 + 2 * i + (label == "run"))
    (root / "jump" / "corrupt.mp4").write_bytes(os.urandom(2000))
    write_video(root / "run" / "short.mp4", 3)
    return root


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents"))
    options = PrepareOptions(
        out=out,
        source="video_folder",
        data_dir=str(folder),
        frames=FRAMES,
        frame_stride=2,
        resolution=RESOLUTION,
        autoencoder="tiny-video",
        flip=True,
        store="mean",
        pyramids=("laplacian_1", "laplacian_2"),
        batch_size=8,
        progress=False,
    )
    return out, prepare(options)


def _centre_clip(path: str, num_frames: int) -> np.ndarray:
    """The expected uint8 clip, from the frames' known content: 5 frames every 2 around the
    centre, each 48x64 frame resized (short side 48 -> 16, BICUBIC; the ADM crop's BOX
    halving first changes flat regions by rounding only) and centre-cropped to 16x16."""
    offset = (num_frames - (1 + (FRAMES - 1) * 2)) // 2
    frames = [frame_content(offset + 2 * i) for i in range(FRAMES)]
    crops = []
    for frame in frames:
        image = Image.fromarray(frame).resize((21, 16), Image.Resampling.BICUBIC)
        crops.append(np.asarray(image)[:, 2:18])
    return np.stack(crops)


def test_prepare_encodes_centre_clips_and_skips_bad_videos(prepared, folder):
    out, result = prepared
    assert (result.records_written, result.skipped_images) == (8, 2)  # 4 videos x 2 flips
    with open(os.path.join(out, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["latent_shape"] == [2, 4, 4, 4]
    assert metadata["extra"]["clip"] == {"frames": 5, "frame_stride": 2, "fps": 0.0}
    assert sorted(metadata["extra"]["skipped_keys"]) == ["jump/corrupt.mp4", "run/short.mp4"]
    assert metadata["extra"]["class_names"] == ["jump", "run"]
    # Records 0 and 1: jump/v0.mp4 (13 frames) and its flip along the width, encoded.
    codec = autoencoder.Codec.load("tiny-video")
    clip = _centre_clip(str(folder / "jump" / "v0.mp4"), 13)
    source = data.ArrayRecordLatentSource(out, latent_sample=False)
    for record, pixels in ((0, clip), (1, clip[:, :, ::-1])):
        expected = codec.encode(viz.from_uint8(pixels)[None])[0]
        np.testing.assert_allclose(source[record]["image"], expected, atol=0.05)
    assert int(source[0]["label"]) == 0


def test_train_on_video_latents_and_write_gifs(prepared, tmp_path):
    out, _ = prepared
    settings = train_utils.tiny_settings({**VIDEO_CONFIG, "data.dir": out})
    assert settings.pyramid.standardize  # video: per-scale stds from the metadata
    state = loop.run(settings, str(tmp_path))
    assert int(state.step) == 2
    with Image.open(tmp_path / "samples" / "step_00000002_grid.gif") as gif:
        assert gif.n_frames >= 1 and gif.size[0] > 2 * RESOLUTION
    assert os.path.exists(tmp_path / "samples" / "step_00000002_previews.gif")
    assert jax.tree.leaves(state.ema_params)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"frames": 0}, "needs --frames >= 1"),
        ({"frames": 6}, "encodes 1 \\+ 4k frames"),
        ({"autoencoder": "tiny"}, "does not encode videos"),
        ({"source": "image_folder"}, "--frames=5 is for video sources"),
        ({"source": "kinetics"}, "no train video folder found"),
    ],
)
def test_prepare_refuses_bad_video_options(folder, tmp_path, overrides, message):
    options = dict(
        out=str(tmp_path / "out"),
        source="video_folder",
        data_dir=str(folder),
        frames=FRAMES,
        resolution=RESOLUTION,
        autoencoder="tiny-video",
        progress=False,
    )
    with pytest.raises(ValueError, match=message):
        prepare(PrepareOptions(**{**options, **overrides}))


def test_reference_statistics_of_decoded_video_latents(prepared, tmp_path):
    """``--compute_reference`` on a latent video dataset decodes the latents first: the
    per-frame statistics are those of the decoded clips' frames."""
    out, _ = prepared
    settings = train_utils.tiny_settings({**VIDEO_CONFIG, "data.dir": out})

    def frame_apply(params, images):  # a stand-in per-frame network: mean colour
        return {"pool3": images.mean(axis=(1, 2))}

    extractor = features.FeatureExtractor("inception", {"pool3": 3}, frame_apply, per_frame=True)
    path = str(tmp_path / "reference.npz")
    counts = references.compute_reference(
        settings, path, ("fid",), {"inception": extractor}, batch_size=8
    )
    codec = autoencoder.Codec.load("tiny-video")
    source = data.ArrayRecordLatentSource(out, latent_sample=True)
    latents = np.stack([source.example(i)["image"] for i in range(len(source))])
    clips = viz.from_uint8(viz.to_uint8(np.asarray(codec.decode(latents))))
    frames = clips.reshape(-1, *clips.shape[2:]).mean(axis=(1, 2))
    assert counts == {"fid": len(frames)}
    with np.load(path) as npz:
        np.testing.assert_allclose(npz["mu"], frames.mean(0), atol=2e-3)
