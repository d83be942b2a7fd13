"""Faces followed through a clip (nada_core.faces.tracking): detection cadence, cuts, landmark smoothing."""
import numpy as np

from nada_core.faces.align import ffhq_quad
from nada_core.faces.tracking import FaceTracker, OneEuro
from tests.clips import moving_face, no_face


def test_landmark_smoothing_reduces_crop_jitter():
    frames = moving_face(24, 128)   # linear motion and zoom: the true crop moves smoothly

    def crops(**kw):
        tracker = FaceTracker(fps=12, detect_every=4, **kw)
        return np.stack([ffhq_quad(tracker.update(f)[0].landmarks) for f in frames])

    raw, smooth = crops(smooth=False), crops()
    jitter = [np.abs(q[2:] - 2 * q[1:-1] + q[:-2]).mean() for q in (raw, smooth)]   # second difference, px
    assert jitter[1] < 0.5 * jitter[0], jitter
    assert np.abs(smooth - raw).mean() < 1.5   # the crop follows the face (lag under 1.5 px on a ~40 px face)
    still = OneEuro()   # 1 px of noise on a face 50 px across, holding still, then moving 8 px a frame
    true = np.concatenate([np.full(100, 100.0), 100 + 8 * np.arange(1, 51)])
    noisy = true + np.random.default_rng(0).normal(0, 1, 150)
    out = np.array([still(np.array([x]), 1 / 25, 50.0)[0] for x in noisy])
    assert out[50:100].std() < 0.4 * noisy[50:100].std()    # still: most of the noise gone
    assert np.abs(out[130:] - true[130:]).mean() < 8         # moving: less than a frame behind


def test_the_tracker_detects_only_every_few_frames_and_at_a_cut():
    inputs = [no_face()] * 2 + moving_face(8, 128) + [no_face()] * 2   # no face, the face moving, a cut
    tracker = FaceTracker(fps=12, detect_every=4)
    counts = [(len(tracker.update(f)), tracker.detections) for f in inputs]
    assert [c for c, _ in counts] == [0, 0] + [1] * 8 + [0, 0]
    # frames 0-2 look for a face; then every 4th frame (4, 8); the cut at frame 10 is caught at once
    assert [d for _, d in counts] == [1, 2, 3, 3, 4, 4, 4, 4, 5, 5, 6, 7]


def test_two_faces_keep_their_ids():
    left, right = moving_face(8, 128), moving_face(8, 128, start=(205.0, 125.0), end=(250.0, 140.0))
    tracker = FaceTracker(fps=12, detect_every=3)
    seen = [tracker.update(np.concatenate([a, b], axis=1)) for a, b in zip(left, right)]
    assert all(len(faces) == 2 for faces in seen) and tracker.detections == 3
    for faces in seen:   # each id stays on its side of the frame
        by_id = {f.id: f.landmarks[:, 0].mean() for f in faces}
        assert set(by_id) == {0, 1} and (by_id[0] < 128) != (by_id[1] < 128)
    assert len({tuple(sorted((f.id, f.landmarks[:, 0].mean() < 128) for f in faces)) for faces in seen}) == 1
