"""Corpus -> shards: `prepare` turns text into a prepared dataset folder, `PreparedDataset` opens one;
`prepare_series` and `PreparedSeries` do the same for numeric time series. Knows nothing of models."""
from pipeline.dataset import PreparedDataset
from pipeline.errors import CorpusError
from pipeline.prepare import PrepareOptions, prepare
from pipeline.series import PreparedSeries, SeriesOptions, prepare_series
from pipeline.vocab import Vocabulary

__all__ = ["CorpusError", "PrepareOptions", "PreparedDataset", "PreparedSeries", "SeriesOptions", "Vocabulary",
           "prepare", "prepare_series"]
