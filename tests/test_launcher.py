"""`python app.py --tiny` really serves the four tabs on the address it is given."""
import json
import os
import subprocess
import sys
import time
import urllib.request

from tests.app_server import free_port
from tests.conftest import ROOT


def test_app_py_serves_the_page(tmp_path):
    port = free_port()
    env = {**os.environ, "NADA_LIBRARY_DIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--tiny", "--port", str(port), "--device", "cpu"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config = None
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    config = json.load(r)
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read())
                time.sleep(0.5)
        assert config is not None, "the app did not come up"
        labels = {c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"}
        assert {"Adapt", "Sample", "Edit", "Selfie"} <= labels
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "NADA Studio on cpu with tiny untrained models; reachable by only this computer" in out


def test_app_py_refuses_a_missing_gpu_and_a_busy_port():
    import socket

    r = subprocess.run([sys.executable, "app.py", "--device", "cuda:3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "app.py", "--tiny", "--port", str(port)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in r.stderr


def test_a_public_link_needs_a_password_or_an_explicit_no():
    r = subprocess.run([sys.executable, "app.py", "--tiny", "--share"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--auth USER:PASS" in r.stderr and "--no-auth" in r.stderr
    r = subprocess.run([sys.executable, "app.py", "--tiny", "--auth", "nopassword"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--auth takes USER:PASS" in r.stderr
    from app import reach
    assert reach("0.0.0.0", False, None) == "anyone who can reach this machine's network"
    assert reach("127.0.0.1", True, ("a", "b")) == "anyone with the public link (password protected)"
