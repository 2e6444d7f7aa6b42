"""Small MP4s for the video tests, written with PyAV (libx264, lossless in YUV).

Frame k has the gray level ``LEVEL0 + STEP * k`` in its top half (so a decoded frame says
which frame it is, up to the RGB <-> YUV rounding) and a red left / blue right bottom
half (so crops and flips are visible).
"""

from __future__ import annotations

import os

import av
import numpy as np

LEVEL0, STEP = 10, 7
HEIGHT, WIDTH = 48, 64


def frame_content(k: int) -> np.ndarray:
    """The uint8 (HEIGHT, WIDTH, 3) frame k: gray level LEVEL0 + STEP k in the top half;
    bottom half red on the left, blue on the right."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[: HEIGHT // 2] = LEVEL0 + STEP * k
    frame[HEIGHT // 2 :, : WIDTH // 2, 0] = 220
    frame[HEIGHT // 2 :, WIDTH // 2 :, 2] = 220
    return frame


def write_video(path, num_frames: int = 32, rate: int = 30) -> str:
    """Writes an H.264 MP4 of `num_frames` `frame_content` frames at `rate` fps."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"qp": "0", "preset": "ultrafast"}  # lossless (in YUV)
        for k in range(num_frames):
            image = av.VideoFrame.from_ndarray(frame_content(k), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return str(path)
