"""s2i: visually grounded speech.

    import s2i
    model = s2i.load("default")                      # or a checkpoint folder
    speech = model.encode_speech(waveform, sample_rate=16000)
    images = model.encode_image(pil_images)
    text = model.encode_text(["a red circle above a blue square"])
    scores, index = model.search(speech, images, k=5)   # top-5 images per spoken query
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "save", "build_model", "available_models"]


def __getattr__(name: str):
    # Lazy: `import s2i` stays cheap (the CLI's --help, the app's cold start).
    if name in ("load", "save", "build_model", "available_models"):
        from s2i import model

        return getattr(model, name)
    raise AttributeError(f"module 's2i' has no attribute {name!r}")
