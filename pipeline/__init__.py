"""Corpus -> shards: `prepare` turns text into a prepared dataset folder, `PreparedDataset` opens one.
Knows nothing of models."""
from pipeline.dataset import PreparedDataset
from pipeline.errors import CorpusError
from pipeline.prepare import PrepareOptions, prepare
from pipeline.vocab import Vocabulary

__all__ = ["CorpusError", "PrepareOptions", "PreparedDataset", "Vocabulary", "prepare"]
