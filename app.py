"""NADA Studio launcher: `python app.py` serves the UI on http://127.0.0.1:7860."""
import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no phoning home


def main(argv=None):
    ap = argparse.ArgumentParser(description="NADA Studio: text-driven domain adaptation of StyleGAN2")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="public Gradio link (off by default)")
    ap.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    ap.add_argument("--tiny", action="store_true", help="serve on tiny untrained test models (offline try-out)")
    args = ap.parse_args(argv)

    import torch

    from demo.app import CSS, build_demo
    from demo.state import Studio

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: PyTorch sees no CUDA GPU here (try --device cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        ap.error("--device mps: Apple's Metal backend is not available here (try --device cpu)")
    studio = Studio(device=args.device, tiny=args.tiny)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    print(f"NADA Studio on {studio.device}{' with tiny untrained models' if args.tiny else ''}")
    try:
        # only the model library (thumbnails, downloads) is served as files; never the weights folder
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, show_error=True,
                    allowed_paths=[str(studio.library_root)])
    except OSError as e:
        ap.exit(1, f"error: cannot serve on {args.host}:{args.port} ({e}); is another copy running? Try --port.\n")


if __name__ == "__main__":
    main()
