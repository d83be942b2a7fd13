"""MP4 export with PyAV (FFmpeg inside the wheel): H.264 in yuv420p, the format every browser plays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_mp4(frames: list[Image.Image], path, fps: int = 12, min_size: int = 0, ping_pong: bool = True) -> Path:
    """Write ``frames`` as an MP4 (ping-pong by default, like the GIF, so the loop has no jump). Frames are
    upscaled to at least ``min_size`` px (tiny models make 32 px images) and to even sizes, which yuv420p needs."""
    import av

    seq = frames + frames[-2:0:-1] if ping_pong and len(frames) > 2 else list(frames)
    w, h = seq[0].size
    scale = max(1, -(-min_size // max(w, h))) if min_size else 1
    W, H = (w * scale) // 2 * 2 or 2, (h * scale) // 2 * 2 or 2
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for img in seq:
            img = img.convert("RGB")
            if img.size != (W, H):
                img = img.resize((W, H), Image.NEAREST if scale > 1 else Image.LANCZOS)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
