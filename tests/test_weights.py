import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from nada_core.store import weights
from nada_core.store.weights import Asset, WeightsError, download, load_manifest, verify
from tests.http_server import Files, serve

PAYLOAD = bytes(range(256)) * 8192  # 2 MiB: more than one download chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "w"))
    Files.reset({"/model.bin": PAYLOAD})
    srv, base = serve()
    yield base
    srv.shutdown()
    Files.reset({})


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


# ---------------------------------------------------------------------------- one writer per file
def unpinned(base, path="/model.bin"):
    return Asset(name="m", kind="generator", file="gen/model.bin", url=base + path)


def gets(path="/model.bin"):
    return [r for r in Files.requests if r[0] == path]


def leftovers(a):
    return sorted(p.name for p in a.path.parent.iterdir() if p.name != a.path.name)


@pytest.mark.parametrize("posix_lock", [True, False], ids=["flock", "o_excl"])
def test_concurrent_threads_write_one_file_once(server, monkeypatch, posix_lock):
    if not posix_lock:
        monkeypatch.setattr(weights, "fcntl", None)  # the fallback for systems without flock
    Files.delay = 0.01  # about 0.3 s per download: the threads overlap
    a = unpinned(server)
    go, results = threading.Barrier(3), []

    def fetch():
        go.wait()
        try:
            results.append(download(a).read_bytes())
        except Exception as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert results == [PAYLOAD] * 3
    assert gets() == [("/model.bin", None)]  # one transfer, nobody appended to it
    assert hashlib.sha256(a.path.read_bytes()).hexdigest() == SHA
    assert leftovers(a) == ["model.bin.verified.json"]  # no .part, no .lock
    assert verify(a) == "ok"


def test_a_second_caller_times_out_with_a_clear_message(server):
    a = unpinned(server)
    a.path.parent.mkdir(parents=True)
    with weights._writer_lock(a.path, "m", wait=1):
        with pytest.raises(WeightsError, match=r"another download of m is still writing model\.bin\.part"):
            download(a, wait=0.3)
    assert Files.requests == [] and not a.path.exists()


def cli_manifest(tmp_path, base, monkeypatch, **entry):
    manifest = {"version": 1, "assets": {"tiny-file": {"kind": "generator", "file": "gen/model.bin",
                                                       "url": base + "/model.bin", **entry}}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(weights, "MANIFEST_PATH", path)
    return load_manifest(path)["tiny-file"]


def start_cli_download(tmp_path):
    """``python -m nada_core weights download tiny-file`` in its own process, on the test's manifest."""
    env = {**os.environ, "NADA_WEIGHTS_DIR": str(tmp_path / "w"), "NADA_MANIFEST": str(tmp_path / "manifest.json")}
    return subprocess.Popen([sys.executable, "-m", "nada_core", "weights", "download", "tiny-file"], env=env,
                            cwd=weights.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, cond, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the CLI ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_app_waits_for_the_cli_downloading_the_same_file(server, tmp_path, monkeypatch):
    a = cli_manifest(tmp_path, server, monkeypatch)  # nothing pinned: the worst case before locking
    Files.delay = 0.1  # about 3 s per download
    proc = start_cli_download(tmp_path)
    try:
        wait_for(proc, lambda: gets(), "the CLI's request")
        assert not a.path.exists()  # the CLI is mid-transfer
        seen = []
        assert download(a, progress=lambda d, t: seen.append(d)).read_bytes() == PAYLOAD
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "tiny-file: ok (" in out
    assert gets() == [("/model.bin", None)]  # the app did not fetch, let alone append
    assert seen and max(seen) <= len(PAYLOAD)  # while waiting, progress showed the CLI's part growing
    assert hashlib.sha256(a.path.read_bytes()).hexdigest() == SHA
    assert weights.read_record(a)["sha256"] == SHA and leftovers(a) == ["model.bin.verified.json"]


def test_a_part_left_by_a_killed_process_is_resumed(server, tmp_path, monkeypatch):
    a = cli_manifest(tmp_path, server, monkeypatch, size=len(PAYLOAD))
    part = a.path.with_name("model.bin.part")
    Files.delay = 0.1  # 1.6 s per MiB
    proc = start_cli_download(tmp_path)
    try:
        wait_for(proc, lambda: weights._size(part) > 0, "the first MiB")
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    Files.delay = 0.0
    kept = part.read_bytes()
    assert 0 < len(kept) < len(PAYLOAD) and kept == PAYLOAD[:len(kept)] and not a.path.exists()
    t0 = time.monotonic()
    assert download(a, wait=30).read_bytes() == PAYLOAD  # its lock died with it: no wait
    assert time.monotonic() - t0 < 10
    assert gets()[-1] == ("/model.bin", f"bytes={len(kept)}-")
    assert leftovers(a) == ["model.bin.verified.json"]


# ---------------------------------------------------------------------------- complete means a known size reached
def test_a_body_without_length_cut_midway_stays_a_part(server):
    Files.no_length.add("/model.bin")
    Files.cut_after["/model.bin"] = 700_000  # the connection closes: to the client it looks like a clean end
    a = unpinned(server)
    with pytest.raises(WeightsError, match=r"incomplete as far as can be told: 700000 bytes came .*run it again to resume"):
        download(a)
    part = a.path.with_name("model.bin.part")
    assert part.read_bytes() == PAYLOAD[:700_000]
    assert not a.path.exists() and not weights.record_path(a).exists() and verify(a) == "missing"
    assert download(a).read_bytes() == PAYLOAD  # the resumed answer's Content-Range states the full size
    assert gets()[-1] == ("/model.bin", "bytes=700000-") and verify(a) == "ok"


def test_a_body_without_length_needs_a_stated_size(server):
    Files.no_length.add("/model.bin")
    a = unpinned(server)
    with pytest.raises(WeightsError, match="incomplete"):  # every byte came, but nothing says so
        download(a)
    assert not a.path.exists()
    assert download(a).read_bytes() == PAYLOAD  # the server's 416 to the resume states the size: it matches
    assert gets()[-1] == ("/model.bin", f"bytes={len(PAYLOAD)}-")
    Files.headers_for["/model.bin"] = {"X-Linked-Size": str(len(PAYLOAD))}
    Files.cut_after["/model.bin"] = 500_000
    b = Asset(name="b", kind="generator", file="gen/b.bin", url=server + "/model.bin")
    with pytest.raises(WeightsError, match=f"incomplete \\(500000 of {len(PAYLOAD)} bytes\\)"):
        download(b)
    assert not b.path.exists()
    c = Asset(name="c", kind="generator", file="gen/c.bin", url=server + "/model.bin", size=len(PAYLOAD))
    assert download(c).read_bytes() == PAYLOAD  # clean end at the manifest's size: complete in one go


# ---------------------------------------------------------------------------- checksums the server publishes
def hf_redirect(etag):
    """Hugging Face's resolve URL answers 302 to the CDN and states size and sha256 on that redirect."""
    Files.files["/cdn/model.bin"] = PAYLOAD
    Files.redirects["/org/repo/resolve/main/model.bin"] = "/cdn/model.bin"
    Files.headers_for["/org/repo/resolve/main/model.bin"] = {"X-Linked-ETag": f'"{etag}"',
                                                             "X-Linked-Size": str(len(PAYLOAD))}
    return Asset(name="hf", kind="generator", file="gen/hf.bin", url="https://huggingface.co/org/repo/resolve/main/model.bin")


def test_x_linked_etag_verifies_a_file_the_manifest_does_not_pin(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    a = hf_redirect(SHA)
    assert download(a).read_bytes() == PAYLOAD
    assert weights.read_record(a) | {"recorded": None} == {"size": len(PAYLOAD), "sha256": SHA, "source": "server",
                                                           "recorded": None}
    assert verify(a) == "ok"


def test_x_linked_etag_mismatch_refuses_the_file(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    a = hf_redirect("ab" * 32)
    with pytest.raises(WeightsError, match=r"sha256 mismatch \(got [0-9a-f]{12}\.\.\., the server says abababababab"):
        download(a)
    assert list(a.path.parent.iterdir()) == []  # no file, no part, no record
    assert [r[0] for r in Files.requests] == ["/org/repo/resolve/main/model.bin", "/cdn/model.bin"]


# ---------------------------------------------------------------------------- records: trust on first use
def test_record_catches_a_flipped_byte_and_repair_fetches_it_again(server, tmp_path, capsys, monkeypatch):
    from nada_core.__main__ import main

    a = cli_manifest(tmp_path, server, monkeypatch)  # nothing pinned in the manifest
    assert main(["weights", "download", "tiny-file"]) == 0
    assert weights.read_record(a)["sha256"] == SHA and verify(a) == "ok"
    data = bytearray(a.path.read_bytes())
    data[1_000_000] ^= 0x01
    a.path.write_bytes(bytes(data))
    assert verify(a) == "sha256 mismatch"
    capsys.readouterr()
    assert main(["weights", "verify"]) == 1
    assert re.search(r"^tiny-file\s+sha256 mismatch .*--repair", capsys.readouterr().out, re.M)
    assert main(["weights", "verify", "--repair"]) == 0
    assert re.search(r"^tiny-file\s+repaired \(was sha256 mismatch\)$", capsys.readouterr().out, re.M)
    assert hashlib.sha256(a.path.read_bytes()).hexdigest() == SHA and len(gets()) == 2
    with open(a.path, "r+b") as f:
        f.truncate(123)
    assert verify(a) == "size mismatch"
    assert weights.repair(["tiny-file"]) == [("tiny-file", "repaired (was size mismatch)")]
    assert a.path.read_bytes() == PAYLOAD and main(["weights", "verify"]) == 0


def test_a_file_placed_by_hand_is_unverified_until_trusted(server, tmp_path, capsys, monkeypatch):
    from nada_core.__main__ import main

    a = cli_manifest(tmp_path, server, monkeypatch)
    a.path.parent.mkdir(parents=True)
    a.path.write_bytes(PAYLOAD[:1000])  # e.g. copied from elsewhere while offline
    assert verify(a) == "unverified" and download(a) == a.path and Files.requests == []  # kept as placed
    assert main(["weights", "verify"]) == 0
    assert re.search(r"^tiny-file\s+unverified .*--trust", capsys.readouterr().out, re.M)
    assert main(["weights", "verify", "--trust"]) == 2  # only together with --repair
    assert weights.repair() == [("tiny-file", "unverified")]
    assert main(["weights", "verify", "--repair", "--trust"]) == 0
    assert re.search(r"^tiny-file\s+trusted$", capsys.readouterr().out, re.M)
    assert weights.read_record(a)["sha256"] == hashlib.sha256(PAYLOAD[:1000]).hexdigest()
    assert verify(a) == "ok" and Files.requests == []
    a.path.write_bytes(PAYLOAD[:999] + b"x")
    assert verify(a) == "sha256 mismatch"


def test_repair_reports_failures_and_goes_on(server, tmp_path, monkeypatch):
    m = {"version": 1, "assets": {
        "gone": {"kind": "generator", "file": "gen/gone.bin", "url": server + "/nope.bin"},
        "fine": {"kind": "generator", "file": "gen/model.bin", "url": server + "/model.bin", "sha256": SHA}}}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    manifest = load_manifest(tmp_path / "manifest.json")
    results = dict(weights.repair(["gone", "fine"], manifest=manifest))
    assert results["gone"].startswith("failed: download of gone failed") and "HTTP 404" in results["gone"]
    assert results["fine"] == "downloaded" and manifest["fine"].path.read_bytes() == PAYLOAD
