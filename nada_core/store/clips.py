"""Video files in and out with PyAV (FFmpeg inside the wheel). A clip's size, duration, frame count and
resolution are checked from its container header before a single frame is decoded, so an upload that
claims a million frames or a 12000 px picture is refused in milliseconds. Frames are read one at a time;
output is H.264 MP4 written to a hidden part file and finished by copying the source's audio packets
into it (re-encoded to AAC only when MP4 cannot hold the codec), so a stopped job still leaves a
playable clip with its sound up to the last frame written."""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

MP4_AUDIO = {"aac", "mp3", "opus", "alac", "flac", "ac3", "eac3"}   # copied as they are; others become AAC


@dataclass(frozen=True)
class ClipLimits:
    """What a clip may be. The defaults suit a shared server: a minute of 1080p."""

    max_bytes: int = 200 * 2 ** 20
    max_seconds: float = 60.0
    max_frames: int = 1800
    max_side: int = 1920


class VideoInputError(ValueError):
    """A clip that cannot be used, named by the user's own file name; the message says which limit."""


@dataclass
class ClipInfo:
    """What the header says: coded picture size, frame rate, frame count, duration, audio codec."""

    width: int
    height: int
    fps: Fraction
    frames: int
    seconds: float
    time_base: Fraction
    audio: str | None          # the audio codec's name, None without sound


def _name(path, display_name: str | None) -> str:
    return display_name or str(path).replace("\\", "/").rsplit("/", 1)[-1]


def probe(path, limits: ClipLimits = ClipLimits(), display_name: str | None = None) -> ClipInfo:
    """Read the container header and refuse the clip (VideoInputError naming the limit) when it is too big,
    too long, has too many frames or too large a picture, or cannot be read. Nothing is decoded here beyond
    what FFmpeg's probe needs to learn the codec's parameters."""
    import av

    name = _name(path, display_name)
    try:
        n_bytes = os.path.getsize(path)
    except OSError:
        raise VideoInputError(f"{name}: the file could not be read") from None
    if n_bytes > limits.max_bytes:
        raise VideoInputError(f"{name}: file too large ({n_bytes / 2 ** 20:.0f} MB); the limit is "
                              f"{limits.max_bytes / 2 ** 20:.0f} MB")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoInputError(f"{name}: could not read the video ({type(e).__name__}); upload an MP4, MOV or "
                              "WebM clip") from None
    with container:
        if not container.streams.video:
            raise VideoInputError(f"{name}: the file has no video stream")
        s = container.streams.video[0]
        w, h = s.codec_context.width, s.codec_context.height
        fps = s.average_rate or s.guessed_rate or s.base_rate
        if not w or not h or not fps:
            raise VideoInputError(f"{name}: could not read the video's picture size or frame rate")
        fps = Fraction(fps)
        seconds = float(s.duration * s.time_base) if s.duration and s.time_base else \
            container.duration / 1e6 if container.duration else 0.0
        frames = int(s.frames) or int(round(seconds * fps))
        seconds = seconds or float(frames / fps)
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        info = ClipInfo(w, h, fps, frames, seconds, s.time_base or Fraction(1, 90000), audio)
    if max(w, h) > limits.max_side:
        raise VideoInputError(f"{name}: picture too large ({w} x {h}); the limit is {limits.max_side} px on the "
                              "long side")
    if frames > limits.max_frames:
        raise VideoInputError(f"{name}: too many frames ({frames}); the limit is {limits.max_frames}")
    if seconds > limits.max_seconds:
        raise VideoInputError(f"{name}: too long ({seconds:.1f} s); the limit is {limits.max_seconds:g} s")
    if not frames:
        raise VideoInputError(f"{name}: the header says nothing about the clip's length; re-save it as MP4")
    return info


def read_frames(path, info: ClipInfo, limits: ClipLimits = ClipLimits(),
                display_name: str | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(RGB uint8 frame, its pts in ``info.time_base``), one at a time, at the header's size and turned upright
    when a phone's display matrix says so. A clip whose frames outnumber its header's claim is refused at
    the limit, not read to its end."""
    import av

    name = _name(path, display_name)
    with av.open(str(path)) as container:
        s = container.streams.video[0]
        s.thread_type = "AUTO"
        n = 0
        try:
            for frame in container.decode(s):
                n += 1
                if n > limits.max_frames:
                    raise VideoInputError(f"{name}: more frames than its header says; the limit is "
                                          f"{limits.max_frames}")
                if (frame.width, frame.height) != (info.width, info.height):
                    frame = frame.reformat(width=info.width, height=info.height)
                rgb = frame.to_ndarray(format="rgb24")
                if frame.rotation % 360:   # counter-clockwise degrees, as np.rot90 turns
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=frame.rotation // 90))
                yield rgb, frame.pts if frame.pts is not None else n - 1
        except av.FFmpegError as e:
            raise VideoInputError(f"{name}: the video is damaged after frame {n} ({type(e).__name__})") from None


class ClipWriter:
    """H.264 (yuv420p) MP4 at the source's frame rate and timestamps and the size of the frames given (even
    sizes, as yuv420p needs), written to ``.NAME.part.mp4`` beside the output; :meth:`finish` adds the
    source's audio up to the last frame and moves the file into place, :meth:`abort` removes it."""

    def __init__(self, path, info: ClipInfo, crf: int = 18):
        import av

        self.path, self.info, self.crf = Path(path), info, crf
        self.part = self.path.with_name(f".{self.path.stem}.part.mp4")
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.part), mode="w")
        self._stream = None
        self.frames, self.last_pts = 0, None

    def _open_stream(self, width: int, height: int):
        import av

        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        stream = self._container.add_stream(codec, rate=self.info.fps, options={"crf": str(self.crf)})
        stream.width, stream.height, stream.pix_fmt = width // 2 * 2 or 2, height // 2 * 2 or 2, "yuv420p"
        stream.codec_context.time_base = self.info.time_base
        return stream

    def write(self, rgb: np.ndarray, pts: int | None = None) -> None:
        """One frame (H, W, 3) uint8; ``pts`` in the source's time base (None: evenly at its frame rate)."""
        import av

        if self._stream is None:
            self._stream = self._open_stream(rgb.shape[1], rgb.shape[0])
        s = self._stream
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:s.height, :s.width]), format="rgb24")
        if pts is None:
            pts = self.frames * max(1, int(round(1 / (self.info.fps * self.info.time_base))))
        if self.last_pts is not None and pts <= self.last_pts:   # a damaged clip's repeated stamp
            pts = self.last_pts + 1
        frame.pts, frame.time_base = pts, self.info.time_base   # the source's own clock: its audio stays in sync
        self.last_pts = pts
        for packet in s.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def _close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode() if self._stream is not None else ():
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def finish(self, source=None) -> Path:
        """Close the video, copy ``source``'s audio (up to the end of the last frame) and move the clip to
        its path. Returns the path."""
        import av

        if not self.frames:
            self.abort()
            raise ValueError("no frames were written")
        self._close()
        end = float((self.last_pts or 0) * self.info.time_base + 1 / self.info.fps)
        staged = self.part.with_name(f".{self.path.stem}.mux.mp4")
        with av.open(str(self.part)) as video, av.open(str(staged), "w", options={"movflags": "faststart"}) as out:
            v_in = video.streams.video[0]
            v_out = out.add_stream_from_template(v_in)
            packets = [(float(p.dts * p.time_base), 0, p, v_out) for p in video.demux(v_in) if p.dts is not None]
            src = av.open(str(source)) if source is not None and self.info.audio else None
            try:
                if src is not None and src.streams.audio:
                    packets += _audio_packets(src, out, end)
                packets.sort(key=lambda item: (item[0], item[1]))
                for _, _, packet, stream in packets:
                    packet.stream = stream
                    out.mux(packet)
            finally:
                if src is not None:
                    src.close()
        os.replace(staged, self.path)
        self.part.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - a half-written file is removed either way
            pass
        self.part.unlink(missing_ok=True)


def _audio_packets(src, out, end: float) -> list[tuple]:
    """The source's first audio stream up to ``end`` seconds, as (time, 1, packet, output stream): the packets
    themselves when MP4 holds the codec, else the sound re-encoded to AAC."""
    a_in = src.streams.audio[0]
    if a_in.codec_context.name in MP4_AUDIO:
        a_out = out.add_stream_from_template(a_in)
        return [(float(p.pts * p.time_base), 1, p, a_out) for p in src.demux(a_in)
                if p.dts is not None and p.pts is not None and float(p.pts * p.time_base) < end]
    rate = a_in.codec_context.sample_rate
    a_out = out.add_stream("aac", rate=rate)
    a_out.layout = a_in.codec_context.layout
    packets, samples = [], 0
    for frame in src.decode(a_in):
        if frame.time is not None and frame.time >= end:
            break
        frame.pts, frame.time_base = samples, Fraction(1, rate)   # counted in samples from the clip's start
        samples += frame.samples
        packets += a_out.encode(frame)
    packets += a_out.encode(None)
    return [(float(p.pts * p.time_base), 1, p, a_out) for p in packets if p.pts is not None]
