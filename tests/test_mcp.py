"""`python app.py --tiny --mcp`: the studio's main actions as MCP tools, called through the real MCP endpoint
(streamable HTTP at /gradio_api/mcp/) as an agent would."""
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image
from skimage import data

from tests.app_server import free_port
from tests.conftest import ROOT

pytest.importorskip("mcp")

TOOLS = {"adapt", "sample_grid", "stylise_photo", "check_prompt"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "NADA_LIBRARY_DIR": str(tmp_path_factory.mktemp("library")), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--tiny", "--mcp", "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/config", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read()) from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    """A photo as an agent sends a file: a data URI (or an http URL)."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


async def _agent(url: str) -> dict:
    """List the tools, check a prompt, train for 60 steps (long enough for the run's view to be read mid-way: progress),
    sample the new model, then stylise a photo sent as a data URI."""
    import httpx
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    seen = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=600)) as http, \
            streamable_http_client(f"{url}/gradio_api/mcp/", http_client=http) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            seen["tools"] = {t.name: t for t in (await session.list_tools()).tools}
            seen["check"] = await session.call_tool("check_prompt", {"source": "photo", "target": "pencil sketch"})
            progress = []

            async def on_progress(step, total, message):
                progress.append(message)

            seen["adapt"] = await session.call_tool("adapt", {"target": "sketch", "source": "photo", "iterations": 60},
                                                    progress_callback=on_progress)
            seen["progress"] = progress
            model = seen["adapt"].content[0].text.split("Model id: ")[-1].strip()
            seen["sample"] = await session.call_tool("sample_grid", {"model": model, "seeds": "0-2"})
            seen["bad"] = await session.call_tool("sample_grid", {"model": model, "seeds": "x-y"})
            photo, wall = data_uri(Image.fromarray(data.astronaut()), "JPEG"), data_uri(Image.new("RGB", (200, 200), (90, 120, 150)))
            seen["stylise"] = await session.call_tool("stylise_photo", {"photo": photo, "model": model, "steps": 5})
            seen["no_face"] = await session.call_tool("stylise_photo", {"photo": wall, "model": model, "steps": 5})
    return seen


def test_the_main_actions_are_mcp_tools_and_the_api_page_lists_the_same(server):
    seen = asyncio.run(_agent(server))
    assert set(seen["tools"]) == TOOLS          # only these: no slider or refresh button of the page
    check = seen["tools"]["check_prompt"]
    assert "How well CLIP separates two prompts" in check.description
    props = check.inputSchema["properties"]
    assert set(props) == {"source", "target"} and props["target"]["type"] == "string"
    assert "the domain to adapt it to" in props["target"]["description"]
    assert set(seen["tools"]["adapt"].inputSchema["properties"]) == {"target", "source", "iterations", "base"}
    # a real prompt report (the tiny CLIP's numbers)
    report = seen["check"].content[0].text
    assert not seen["check"].isError and report.startswith("Prompt check:") and "tiny: strength" in report
    # training: step progress reported, then the saved model's id
    done = seen["adapt"].content[0].text
    assert not seen["adapt"].isError and "Finished: 60/60 steps" in done and "Model id: photo-to-sketch" in done
    assert any(m and "training" in m and "of 60" in m for m in seen["progress"]), seen["progress"]
    # the grid comes back as an image: 3 seeds, source over adapted, 32 px tiles shown at 128 px
    image = next(c for c in seen["sample"].content if c.type == "image")
    grid = Image.open(io.BytesIO(base64.b64decode(image.data)))
    assert grid.size == (3 * 128 + 2 * 4, 2 * 128 + 4)
    assert seen["bad"].isError and "Seeds must look like" in seen["bad"].content[0].text
    # a selfie through the tool: the photo with the face pasted back, the aligned/stylised pair, the error
    assert not seen["stylise"].isError, seen["stylise"].content
    images = [Image.open(io.BytesIO(base64.b64decode(c.data))) for c in seen["stylise"].content if c.type == "image"]
    assert [im.size for im in images] == [(512, 512 + 256)]   # the astronaut photo over the 256 px crop and its style
    assert [c.type for c in seen["stylise"].content] == ["image", "text"]   # the picture and its URL, no raw tuple
    assert seen["stylise"].content[1].text.startswith("Image URL: http://")
    assert seen["no_face"].isError and "no face found" in seen["no_face"].content[0].text
    # the API page documents the same four endpoints, beside the page's own (callable as before)
    with urllib.request.urlopen(f"{server}/gradio_api/info", timeout=10) as r:
        endpoints = json.load(r)["named_endpoints"]
    assert {f"/{t}" for t in TOOLS} | {"/sample", "/train", "/selfie"} <= set(endpoints)
    assert "How well CLIP separates two prompts" in endpoints["/check_prompt"]["description"]
    assert [p["parameter_name"] for p in endpoints["/adapt"]["parameters"]] == ["target", "source", "iterations", "base"]
