"""NADA Studio launcher: `python app.py` serves the UI on http://127.0.0.1:7860."""
import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no phoning home

MAX_UPLOAD = "2gb"   # model import; photos and style images are refused above 25 MB by their loader


def reach(host: str, share: bool, auth) -> str:
    """Who can open the app, said plainly on start."""
    local = host in ("127.0.0.1", "localhost", "::1")
    who = "only this computer" if local and not share else "anyone who can reach this machine's network"
    if share:
        who = "anyone with the public link"
    return who + (" (password protected)" if auth else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description="NADA Studio: text-driven domain adaptation of StyleGAN2")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="public Gradio link (needs --auth or --no-auth)")
    ap.add_argument("--auth", default=None, metavar="USER:PASS", help="ask visitors for this user name and password")
    ap.add_argument("--no-auth", action="store_true", help="with --share: really serve without a password")
    ap.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    ap.add_argument("--tiny", action="store_true", help="serve on tiny untrained test models (offline try-out)")
    ap.add_argument("--mcp", action="store_true", help="also serve the main actions as MCP tools for agents, at "
                    "/gradio_api/mcp/ (needs the mcp package: pip install 'gradio[mcp]')")
    args = ap.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            ap.error("--auth takes USER:PASS")
        auth = (user, password)
    if args.share and not auth and not args.no_auth:
        ap.error("--share makes a public link to a machine that trains on its GPU: add --auth USER:PASS, "
                 "or --no-auth if anyone on the internet may use it")

    import torch

    from demo.app import CSS, build_demo
    from demo.state import Studio
    from nada_core.training.process import training_process

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: PyTorch sees no CUDA GPU here (try --device cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        ap.error("--device mps: Apple's Metal backend is not available here (try --device cpu)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    studio = Studio(device=args.device, tiny=args.tiny)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    print(f"NADA Studio on {studio.device}{' with tiny untrained models' if args.tiny else ''}; "
          f"reachable by {reach(args.host, args.share, auth)}")
    try:
        # only the model library (thumbnails, downloads) is served as files; never the weights folder
        with training_process(studio.device, tiny=studio.tiny):   # CPU memory and threads (training/process.py)
            demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, show_error=True,
                        allowed_paths=[str(studio.library_root)], auth=auth, max_file_size=MAX_UPLOAD,
                        mcp_server=args.mcp)
    except OSError as e:
        ap.exit(1, f"error: cannot serve on {args.host}:{args.port} ({e}); is another copy running? Try --port.\n")


if __name__ == "__main__":
    main()
