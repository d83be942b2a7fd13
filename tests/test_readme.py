"""The README's "Use it from Python" section runs as printed (on the tiny models, in a fresh process)."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def python_section() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_the_use_it_from_python_example_trains_saves_and_compares(tmp_path):
    code = python_section()
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    assert steps == list(range(1, 21)) and any(line.startswith("done 20 ") for line in lines)
    assert (tmp_path / "runs" / "sketch" / "final.safetensors").is_file()
    pair = np.asarray(Image.open(tmp_path / "before_after.png").convert("RGB")).astype(int)
    top, bottom = pair[: pair.shape[0] // 2], pair[pair.shape[0] - pair.shape[0] // 2:]
    assert np.abs(top - bottom).mean() > 1   # the adapted row differs from the base row
