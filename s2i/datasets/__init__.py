"""Corpora: the prepared-corpus format, the dataset and batching every corpus uses, feature caches,
and readers that turn the shipped layouts of real corpora into that format.

    from s2i.datasets import PairedDataset, BucketBatchSampler, collate
    ds = PairedDataset("data/flickr8k", "train", features="mfcc", image_input="resnet152")
    sampler = BucketBatchSampler(ds.lengths, 32, caption_image=ds.caption_image)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=4)

Modules: ``corpus`` (format, dataset, samplers), ``cache`` (feature caches), ``flickr8k`` /
``places`` / ``spokencoco`` (readers), ``prepare`` (the ``prepare`` CLI), ``synthetic``,
``speech_synthesis``, ``augment`` (the built-in corpus and waveform augmentation).
"""
from __future__ import annotations

_EXPORTS = {
    "CorpusError": "corpus", "CorpusInfo": "corpus", "read_corpus": "corpus", "read_split": "corpus",
    "PairedDataset": "corpus", "collate": "corpus", "BucketBatchSampler": "corpus", "RandomBatchSampler": "corpus",
    "padding_fraction": "corpus", "Manifest": "corpus", "write_corpus": "corpus", "build_caches": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so `import s2i.datasets.speech_synthesis` does not pull in torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"s2i.datasets.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 's2i.datasets' has no attribute {name!r}")
