"""Encoders into the shared embedding space: speech (:mod:`.speech`), images (:mod:`.image`), text
(:mod:`.text`), and what they share: masked pooling (:mod:`.pooling`) and bidirectional RNN layers
that never see padding (:mod:`.rnn`)."""
