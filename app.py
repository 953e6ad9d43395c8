"""s2i's Gradio app (placeholder page until the full app lands)."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="s2i") as demo:
        gr.Markdown("# s2i: speech ↔ image\nThe full app is being built.")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="s2i Gradio app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    build_demo().launch(server_name=args.host, server_port=args.port, ssr_mode=False)


if __name__ == "__main__":
    main()
