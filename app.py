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

    from demo.app import CSS, build_demo
    from demo.state import Studio
    from nada_core.weights import weights_dir

    studio = Studio(device=args.device, tiny=args.tiny)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    print(f"NADA Studio on {studio.device}{' with tiny untrained models' if args.tiny else ''}")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, show_error=True,
                allowed_paths=[str(studio.library_root), str(weights_dir())])


if __name__ == "__main__":
    main()
