import hashlib
import json
import re
import socket

import pytest

from nada_core import weights
from nada_core.weights import Asset, WeightsError, download, load_manifest, verify
from tests.http_server import Files, serve

PAYLOAD = bytes(range(256)) * 8192  # 2 MiB: more than one download chunk


@pytest.fixture()
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "w"))
    Files.files = {"/model.bin": PAYLOAD}
    Files.cut_after, Files.requests = {}, []
    srv, base = serve()
    yield base
    srv.shutdown()


def asset(base, **kw):
    return Asset(name="m", kind="generator", file="gen/model.bin", url=base + "/model.bin",
                 sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), **kw)


def test_download_verifies_and_lands_atomically(server):
    seen = []
    a = asset(server)
    path = download(a, progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == PAYLOAD and verify(a) == "ok"
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) >= 2
    assert not path.with_name(path.name + ".part").exists()
    n = len(Files.requests)
    download(a)  # present and verified: no second request
    assert len(Files.requests) == n


def test_resume_after_a_cut(server):
    Files.cut_after["/model.bin"] = 700_000
    a = asset(server)
    with pytest.raises(WeightsError, match="resume"):
        download(a)
    part = a.path.with_name(a.path.name + ".part")
    assert part.stat().st_size == 700_000 and not a.path.exists()  # nothing under the final name
    download(a)
    assert Files.requests[-1] == ("/model.bin", "bytes=700000-")
    assert a.path.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_the_file(server):
    a = Asset(name="m", kind="generator", file="gen/model.bin", url=server + "/model.bin", sha256="0" * 64)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        download(a)
    assert not a.path.exists() and not a.path.with_name("model.bin.part").exists()


def test_404_names_the_url(server):
    a = Asset(name="m", kind="generator", file="gen/x.bin", url=server + "/nope.bin")
    with pytest.raises(WeightsError, match=r"HTTP 404.*save it as .*x\.bin"):
        download(a)


def test_offline_message_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ffhq.pkl"
    a = Asset(name="ffhq-256", kind="generator", file="generators/ffhq.pkl", url=url)
    with pytest.raises(WeightsError) as e:
        download(a, timeout=5)
    msg = str(e.value)
    assert "offline" in msg and url in msg and str(tmp_path / "generators" / "ffhq.pkl") in msg


def test_manifest_is_complete_and_require_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    m = load_manifest()
    kinds = {a.kind for a in m.values()}
    assert {"generator", "style", "clip", "encoder", "direction", "landmarks"} <= kinds
    assert {"ffhq-256", "ffhq-1024", "afhqdog", "afhqcat", "metfaces", "e4e-ffhq"} <= set(m)
    assert "transfer-learning-source-nets/ffhq-res256-mirror-paper256-noaug.pkl" in m["ffhq-256"].url
    for a in m.values():
        if a.kind == "direction":  # pinned to commits, with checksums
            assert a.sha256 and len(a.url.split("/")[5]) == 40
    with pytest.raises(WeightsError, match=r"weights download ffhq-256"):
        weights.require("ffhq-256")
    assert m["dlib-landmarks"].present  # shipped by the face-recognition-models wheel
    json.dumps(list(weights.status_rows(m)))


def test_reference_direction_files_verify_against_the_manifest(tmp_path, monkeypatch):
    import shutil
    from tests.conftest import DATA
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    m = load_manifest()
    src = {"dir-age": "nada_interfacegan_boundaries/age.pt", "dir-pose": "e4e_directions/pose.pt",
           "dir-ffhq-pca": "e4e_directions/ffhq_pca.pt"}
    for name, rel in src.items():
        m[name].path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / rel, m[name].path)
        assert verify(m[name]) == "ok"


def test_hf_endpoint_mirror_is_honoured(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    Files.files["/org/repo/resolve/main/model.bin"] = PAYLOAD
    a = Asset(name="m", kind="generator", file="gen/hf.bin", url="https://huggingface.co/org/repo/resolve/main/model.bin",
              size=len(PAYLOAD))
    assert download(a).read_bytes() == PAYLOAD
    assert Files.requests[-1][0] == "/org/repo/resolve/main/model.bin"


def test_cli_downloads_and_verifies(server, tmp_path, capsys, monkeypatch):
    from nada_core.__main__ import main

    manifest = {"version": 1, "assets": {"tiny-file": {"kind": "generator", "file": "gen/model.bin", "url": server + "/model.bin",
                                                       "sha256": hashlib.sha256(PAYLOAD).hexdigest(), "size": len(PAYLOAD)}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "MANIFEST_PATH", tmp_path / "manifest.json")
    assert main(["weights", "download", "tiny-file"]) == 0
    assert main(["weights", "verify"]) == 0
    out = capsys.readouterr().out
    assert "tiny-file: ok (" in out  # after the download
    assert re.search(r"^tiny-file\s+ok$", out, re.M)  # from verify
    assert main(["weights", "download"]) == 2
    (tmp_path / "w" / "gen" / "model.bin").unlink()
    assert main(["weights", "download", "--kind", "generator"]) == 0  # every asset of a kind
    assert (tmp_path / "w" / "gen" / "model.bin").read_bytes() == PAYLOAD
