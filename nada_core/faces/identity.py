"""Face identity, in one place: how far an edited or adapted face is from the person it started as.

* dlib's face descriptor (a ResNet giving 128-D codes; dlib counts a distance under ``SAME_PERSON`` as the
  same person). Landmarks come from the detector of ``faces.align``; an image without a detected face is
  read at the source's landmarks (adapted images keep the latent's geometry), or, for generator output
  (``aligned=True``), in the box an FFHQ-aligned face fills. dlib computes outside autograd, so it is a
  measure: the training diagnostics report it, and the mapper reports it beside its losses.
* ArcFace IR-SE-50 (``model_ir_se50.pth``), the official differentiable identity loss of StyleCLIP and
  StyleGAN-NADA's mappers: ``1 - cos`` of the embeddings of FFHQ-aligned crops.
* :func:`identity_for` picks one of them for a model.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..models.encoders import IR_SE_50, IRSE
from ..models.tiny import is_tiny
from ..store import weights
from .align import detect, landmarks_in_box

SAME_PERSON = 0.6           # dlib's threshold on descriptor distance for "same person"
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
FACE_DOMAINS = ("ffhq", "metfaces", "celeba", "face")
# where dlib's detector finds an FFHQ-aligned face (left, top, right, bottom as fractions of the side)
ALIGNED_BOX = (0.26, 0.375, 0.766, 0.88)


class IdentityError(ValueError):
    """An identity term that cannot be used (weights that are not ArcFace's, an unknown mode)."""


class IdentityModelMissing(RuntimeError):
    """dlib's face recognition model is not installed."""


# ------------------------------------------------------------------ dlib's descriptor
def recognition_model_path() -> Path:
    """dlib's recognition ResNet, shipped in the ``face-recognition-models`` wheel (located without importing
    it: its ``__init__`` needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "models" / RECOGNITION_MODEL
        if path.is_file():
            return path
    raise IdentityModelMissing("dlib's face recognition model is missing: install it with "
                               f"`pip install face-recognition-models` (it ships {RECOGNITION_MODEL})")


def descriptor_available() -> bool:
    """Both dlib models (recognition and 68 landmarks) are installed."""
    try:
        recognition_model_path()
        weights.require("dlib-landmarks")
    except (IdentityModelMissing, weights.WeightsError):
        return False
    return True


@lru_cache(maxsize=1)
def _recognition_model():
    import dlib

    return dlib.face_recognition_model_v1(str(recognition_model_path()))


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> B RGB uint8 arrays (H, W, 3), rounded like images.to_pil."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [np.ascontiguousarray(a) for a in x.permute(0, 2, 3, 1).numpy()]


def face_landmarks(image: np.ndarray, aligned: bool = False) -> np.ndarray | None:
    """(68, 2) landmarks of the largest detected face in an RGB uint8 image, or None. With ``aligned``
    (generator output: FFHQ-aligned, the face fills a known box) the landmarks are found in that box without
    the detector, which would cost more than a whole mapper step at 1024 px and find nothing in early,
    untrained output."""
    if not aligned:
        faces = detect(Image.fromarray(image))
        return faces.landmarks[0] if faces.count else None
    h, w = image.shape[:2]
    l, t, r, b = ALIGNED_BOX
    return landmarks_in_box(image, (round(l * w), round(t * h), round(r * w), round(b * h)))


def face_descriptor(image: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """dlib's 128-d descriptor of the face at landmarks ``lm`` (68 points) in an RGB uint8 image."""
    import dlib

    pts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in lm])
    x0, y0 = np.floor(lm.min(0)).astype(int)
    x1, y1 = np.ceil(lm.max(0)).astype(int)
    shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), pts)
    return np.asarray(_recognition_model().compute_face_descriptor(image, shape))


def identity_distances(source: torch.Tensor, adapted: torch.Tensor, reuse_source_landmarks: bool = True,
                       aligned: bool = False) -> list[float | None]:
    """Per pair, the descriptor distance between the source face and its adapted version; None where the
    source has no face (never with ``aligned``: both are read in the aligned box, see :func:`face_landmarks`).
    Adapted faces the detector no longer finds (strong styles) are read at the source's landmarks when
    ``reuse_source_landmarks``, else they count as None."""
    out: list[float | None] = []
    for src, ada in zip(to_uint8(source), to_uint8(adapted)):
        lm = face_landmarks(src, aligned)
        if lm is None:
            out.append(None)
            continue
        lm_ada = face_landmarks(ada, aligned)
        if lm_ada is None and not reuse_source_landmarks:
            out.append(None)
            continue
        d_src = face_descriptor(src, lm)
        d_ada = face_descriptor(ada, lm if lm_ada is None else lm_ada)
        out.append(float(np.linalg.norm(d_src - d_ada)))
    return out


def identity_distance(source: torch.Tensor, adapted: torch.Tensor, reuse_source_landmarks: bool = True) -> float | None:
    """Mean descriptor distance over the pairs with a face (0 = same face; dlib: < 0.6 same person)."""
    found = [d for d in identity_distances(source, adapted, reuse_source_landmarks) if d is not None]
    return sum(found) / len(found) if found else None


class DlibIdentity:
    """The descriptor distance as an identity term ``(x_hat, x) -> tensor`` (batch mean) for generator
    output: monitored, reported with the losses but not trained against (dlib has no gradients)."""

    differentiable = False
    name = "identity_distance"

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        d = identity_distances(x, x_hat, aligned=True)
        return torch.tensor(sum(d) / len(d))


# ------------------------------------------------------------------ ArcFace
class ArcFace(IRSE):
    """ArcFace IR-SE-50 (the official identity network, ``model_ir_se50.pth``): 112 px face -> unit 512-D."""

    def __init__(self, drop_ratio: float = 0.6):
        super().__init__(3, IR_SE_50)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(drop_ratio), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=-1)


class ArcFaceIdentity:
    """The official identity loss: mean over the batch of ``1 - <f(x_hat), f(x)>`` on FFHQ-aligned faces
    (pooled to 256, cropped to [35:223, 32:220], pooled to 112). Differentiable."""

    differentiable = True
    name = "identity"

    def __init__(self, net: ArcFace):
        self.net = net.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 256:
            x = F.adaptive_avg_pool2d(x, (256, 256))
        x = F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))
        return self.net(x.to(next(self.net.parameters()).dtype)).float()

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.features(x)
        return (1 - (self.features(x_hat) * f).sum(-1)).mean()


def load_arcface(path: str | os.PathLike, device: str | torch.device = "cpu") -> ArcFaceIdentity:
    """ArcFace IR-SE-50 weights (``model_ir_se50.pth``, a plain state dict) from a user-supplied path."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = ArcFace()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise IdentityError(f"{path}: not ArcFace IR-SE-50 weights ({str(e).splitlines()[0][:200]})") from None
    return ArcFaceIdentity(net.to(device))


# ------------------------------------------------------------------ choosing one
def identity_for(mode: str = "auto", arcface_path: str | None = None, model_name: str = "",
                 device: str | torch.device = "cpu") -> tuple[Callable | None, str]:
    """Pick the identity term: (callable(x_hat, x) or None, a note saying which). ``mode``: auto | arcface |
    dlib | off. auto: ArcFace when a weights file is given, else dlib's descriptor (monitored only) for
    face models when face-recognition-models is installed, else off (e.g. the tiny models)."""
    if mode not in ("auto", "arcface", "dlib", "off"):
        raise IdentityError("identity must be auto, arcface, dlib or off")
    if mode == "off" or is_tiny(model_name):
        return None, "identity loss off"
    if arcface_path or mode == "arcface":
        if not arcface_path:
            raise IdentityError("the ArcFace identity loss needs its weights: pass the path to model_ir_se50.pth")
        return load_arcface(arcface_path, device), f"identity loss: ArcFace IR-SE-50 ({arcface_path})"
    if mode == "dlib" or any(k in model_name.lower() for k in FACE_DOMAINS):
        if not descriptor_available():
            if mode == "dlib":
                recognition_model_path()   # raises the one message saying what to install
                raise IdentityModelMissing("dlib's 68-landmark model is missing: `pip install face-recognition-models`")
            return None, "identity loss off (no ArcFace weights given and face-recognition-models is not installed)"
        return DlibIdentity(), ("identity: dlib face descriptor distance, monitored only (dlib is not "
                                "differentiable; pass ArcFace IR-SE-50 weights to train against identity)")
    return None, "identity loss off (not a face model)"
