"""Video stylisation on small clips built from a real photo (tests/clips.py), with the tiny generators."""
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from nada_core.faces.align import detect
from nada_core.faces.invert import refine
from nada_core.faces.video import VideoStyliser, output_paths, stylize_clip
from nada_core.models.tiny import tiny_generator
from nada_core.store.clips import probe, read_frames
from tests.clips import face_chroma_gap, moving_face, no_face, patched_frame_count, write_clip

FACELESS = [0, 1, 10, 11]   # the clip below: two shots without a face, eight of the face moving, a cut to two more


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = [no_face()] * 2 + moving_face(8, 128) + [no_face()] * 2
    return write_clip(frames, tmp_path_factory.mktemp("clip") / "in.mp4", fps=12, audio=True)


def styliser(**kw):
    return VideoStyliser(tiny_generator(), {"warm": tiny_generator(seed=4), "cool": tiny_generator(seed=5)},
                         steps=2, first_steps=10, detect_every=4, **kw)


@pytest.fixture(scope="module")
def stylised(clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    info = probe(clip)
    seen = []
    result = stylize_clip(clip, info, styliser(), output_paths(out / "o.mp4", ["warm", "cool"]), progress=seen.append)
    return info, result, seen


def decoded(path):
    return [rgb for rgb, _ in read_frames(path, probe(path))]


def audio_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def test_output_keeps_frames_size_rate_and_sound(clip, stylised):
    info, result, seen = stylised
    assert not result.cancelled and result.done == info.frames == 12 and result.with_faces == 8
    assert sorted(p.name for p in result.outputs.values()) == ["o-cool.mp4", "o-warm.mp4"]
    for path in result.outputs.values():
        out = probe(path)
        assert (out.frames, out.width, out.height, out.fps) == (12, 128, 128, info.fps)
        assert out.audio == "aac" and audio_packets(path) == audio_packets(clip)   # the sound copied packet for packet
        assert not list(path.parent.glob(".*part*"))                                # no part file left behind
    assert [p.done for p in seen] == list(range(1, 13)) and [p.faces for p in seen] == [0, 0] + [1] * 8 + [0, 0]
    assert seen[-1].preview.shape == (128, 128, 3) and seen[-1].frames_per_second > 0


def test_faceless_frames_pass_through_and_faces_change(clip, stylised):
    _, result, _ = stylised
    inputs = decoded(clip)
    s = styliser()
    for i, frame in enumerate(inputs):   # the per-frame pipeline hands faceless frames back untouched
        out = s(frame)
        assert (out.faces == 0) == (i in FACELESS)
        if i in FACELESS:
            assert all(f is frame for f in out.frames.values())
    warm, cool = decoded(result.outputs["warm"]), decoded(result.outputs["cool"])
    for i in range(12):
        diff = np.abs(warm[i].astype(int) - inputs[i]).mean()
        if i in FACELESS:      # in the file only the H.264 round trip differs (about 2 here; x264 varies by machine)
            assert diff < 5, (i, diff)
            continue
        left, top, right, bottom = detect(Image.fromarray(inputs[i])).boxes[0]
        box = (slice(top + 4, bottom - 4), slice(left + 4, right - 4))
        assert np.abs(warm[i][box].astype(int) - inputs[i][box]).mean() > 20, i      # the face was replaced
        assert np.abs(warm[i][box].astype(int) - cool[i][box]).mean() > 10, i        # differently per style
        corner = (slice(0, 16), slice(0, 16))
        assert np.abs(warm[i][corner].astype(int) - inputs[i][corner]).mean() < 5     # far from the face: as it was


def test_codes_are_smoothed_and_warm_started():
    frames = moving_face(12, 128)

    def crop_change(**kw):
        s = VideoStyliser(tiny_generator(), {"warm": tiny_generator(seed=4)}, steps=2, first_steps=10,
                          detect_every=4, **kw)
        renders = [np.asarray(s(f).stylised["warm"][0], dtype=float) for f in frames]
        return np.mean([np.abs(renders[t] - renders[t - 1]).mean() for t in range(1, len(renders))])

    smoothed, raw = crop_change(), crop_change(code_alpha=1.0)
    assert smoothed < 0.92 * raw, (smoothed, raw)   # the stylised face changes less from frame to frame
    G = tiny_generator()   # a few steps from a nearby code (the previous frame's) move towards the target
    g = torch.Generator().manual_seed(1)
    w_true = G.to_w_plus(G.mapping(torch.randn(1, G.style_dim, generator=g)))
    w_near = w_true + 0.3 * torch.randn(w_true.shape, generator=g)
    with torch.no_grad():
        target = G.synthesis(w_true)
        before = (G.synthesis(w_near) - target).pow(2).mean().item()
    w = refine(G, target, w_near, steps=10, lr=0.01)
    with torch.no_grad():
        after = (G.synthesis(w) - target).pow(2).mean().item()
    assert after < 0.7 * before, (after, before)
    assert torch.equal(refine(G, target, w_near, steps=0), w_near)


def test_stop_keeps_the_frames_done(clip, tmp_path):
    info = probe(clip)
    stop = threading.Event()

    def progress(p):
        if p.done == 5:
            stop.set()

    result = stylize_clip(clip, info, styliser(), {"warm": tmp_path / "w.mp4", "cool": tmp_path / "c.mp4"},
                          progress=progress, stop=stop)
    assert result.cancelled and result.done == 5
    assert result.message.startswith("cancelled at frame 5 of 12; the 5 frames done are saved")
    out = probe(result.outputs["warm"])
    assert out.frames == 5 and out.audio == "aac" and out.seconds == pytest.approx(5 / 12, abs=0.01)
    kept = audio_packets(result.outputs["warm"])
    assert 0 < len(kept) < len(audio_packets(clip)) and kept == audio_packets(clip)[:len(kept)]
    stop.set()   # stopped before the first frame: nothing written
    nothing = stylize_clip(clip, info, styliser(), {"warm": tmp_path / "w2.mp4", "cool": tmp_path / "c2.mp4"},
                           stop=stop)
    assert nothing.cancelled and not nothing.outputs and not list(tmp_path.glob("*2.mp4"))
    assert nothing.message == "cancelled before the first frame; nothing was written"


def test_styles_must_share_the_base_and_steps_are_needed():
    G = tiny_generator()
    with pytest.raises(ValueError, match="different architecture"):
        VideoStyliser(G, {"wide": tiny_generator(channel_max=16)})
    with pytest.raises(ValueError, match="at least one style"):
        VideoStyliser(G, {})
    with pytest.raises(ValueError, match="at least one optimisation step"):
        VideoStyliser(G, {"warm": tiny_generator(seed=4)}, steps=0)
    assert output_paths("out/o.mp4", ["ink"]) == {"ink": Path("out/o.mp4")}
    assert output_paths("o.mp4", ["Ink wash", "pop"]) == {"Ink wash": Path("o-ink-wash.mp4"), "pop": Path("o-pop.mp4")}


def test_cli_video(clip, tmp_path, capsys):
    from nada_core.__main__ import main
    from nada_core.store.checkpoints import save_generator

    ink = save_generator(tiny_generator(seed=4), tmp_path / "ink" / "final.safetensors", {"source_model": "tiny"})
    pop = save_generator(tiny_generator(seed=5), tmp_path / "pop" / "final.safetensors", {"source_model": "tiny"})
    assert main(["video", str(clip), "--style", str(ink), "--style", str(pop), "--out", str(tmp_path / "out.mp4"),
                 "--steps", "1", "--first-steps", "5", "--loss", "pixels"]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == [str(tmp_path / "out-ink.mp4"), str(tmp_path / "out-pop.mp4")]
    assert "12 frames, 8 with a face stylised" in printed.err
    for name in ("out-ink.mp4", "out-pop.mp4"):
        out = probe(tmp_path / name)
        assert (out.frames, out.width, out.fps, out.audio) == (12, 128, 12, "aac")
    (tmp_path / "million.mp4").write_bytes(patched_frame_count(clip, 10 ** 6))
    assert main(["video", str(tmp_path / "million.mp4"), "--style", str(ink), "--out", str(tmp_path / "x.mp4")]) == 1
    assert "too many frames (1000000); the limit is 1800" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()

    # --keep-colours: the faces take the clip's own colours (compared on the face, against the plain output)
    assert main(["video", str(clip), "--style", str(ink), "--out", str(tmp_path / "kept.mp4"), "--steps", "1",
                 "--first-steps", "5", "--loss", "pixels", "--keep-colours"]) == 0
    source = decoded(clip)
    far, near = (face_chroma_gap(source, decoded(tmp_path / name)) for name in ("out-ink.mp4", "kept.mp4"))
    assert near < 0.6 * far, (near, far)
    capsys.readouterr()
    assert main(["video", str(clip), "--style", str(ink), "--out", str(tmp_path / "y.mp4"), "--keep-colours", "2"]) == 1
    assert "--keep-colours must be between 0 and 1, got 2" in capsys.readouterr().err and not (tmp_path / "y.mp4").exists()


def test_the_faces_can_keep_the_clips_colours(clip):
    """'Keep my photo's colours' in a video: each stylised face takes its aligned crop's chroma by the strength."""
    def chroma(img):
        return np.asarray(img.convert("YCbCr"), dtype=np.float64)[..., 1:]

    frame = decoded(clip)[4]            # a frame with the face
    plain, kept = styliser()(frame), styliser(keep_colours=1.0)(frame)
    photo = chroma(plain.aligned[0].resize(plain.stylised["warm"][0].size, Image.LANCZOS))
    far, near = (np.abs(chroma(out.stylised["warm"][0]) - photo).mean() for out in (plain, kept))
    assert near < 0.5 * far, (near, far)
    with pytest.raises(ValueError, match="keep colours must be between 0 and 1"):
        styliser(keep_colours=2.0)
