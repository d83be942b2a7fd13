"""Launch the real app (tiny models) in-process on a free 127.0.0.1 port, for client and browser tests."""
import contextlib
import html
import re
import socket

from app import MAX_UPLOAD
from demo.app import CSS, build_demo
from demo.state import Studio
from nada_core.training.process import training_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_tiny():
    """(demo, studio, url), with the process settings app.py enters for a tiny studio (CPU memory, one thread)
    until ``demo.close()``."""
    settings = contextlib.ExitStack()
    settings.enter_context(training_process("cpu", tiny=True))
    studio = Studio(device="cpu", tiny=True)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS, show_error=True,
                max_file_size=MAX_UPLOAD,
                allowed_paths=[str(studio.library_root)])
    close = demo.close

    def close_and_restore(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            settings.close()

    demo.close = close_and_restore
    return demo, studio, f"http://127.0.0.1:{port}/"


def unchanged(updates) -> bool:
    """True when every output of a call was left as it was (a no-op update, or nothing sent)."""
    return all(u is None or (isinstance(u, dict) and set(u) <= {"__type__"}) for u in updates)


def refusal(call) -> str:
    """What a refused call answers: the error it raised (single-output handlers), or the message line of a panel or
    a streaming run, which answers there and leaves every other output as it was (checked here)."""
    try:
        out = call()
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return str(e)
    assert isinstance(out, (list, tuple)) and "nada-warn" in str(out[0]), f"not refused: {str(out)[:300]}"
    assert unchanged(out[1:]), f"a refusal changed other outputs: {str(out[1:])[:300]}"
    return html.unescape(re.sub(r"<[^>]+>", "", out[0]))   # the text the user reads
