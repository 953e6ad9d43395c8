"""Encoders into the shared embedding space: speech (:mod:`.speech`), images (:mod:`.image`), text
(:mod:`.text`), and the masked pooling they share (:mod:`.pooling`)."""
