"""Launch the real app (tiny models) in-process on a free 127.0.0.1 port, for client and browser tests."""
import socket

from app import MAX_UPLOAD
from demo.app import CSS, build_demo
from demo.state import Studio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_tiny():
    studio = Studio(device="cpu", tiny=True)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS, show_error=True,
                max_file_size=MAX_UPLOAD,
                allowed_paths=[str(studio.library_root)])
    return demo, studio, f"http://127.0.0.1:{port}/"
