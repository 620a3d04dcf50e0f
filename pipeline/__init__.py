"""Corpus -> prepared dataset (docs/contracts.md, sections 1 and 4.1). Knows nothing of models.

shards.py     what both kinds share: splits, manifest, shard files, ShardedDataset, open_prepared
sources.py    the user's INPUTs (files, folders, globs, URIs) as a sorted list of files
errors.py     CorpusError
text/         `charrnn prepare`: vocab.py (no Ray: sample and serve use it), ranges.py (byte ranges
              as Ray Data read tasks), prepare.py, dataset.py (PreparedDataset)
series/       `charrnn prepare-series`: read.py (checked CSV/Parquet reading), source.py (its Ray
              Data datasource), prepare.py, dataset.py (PreparedSeries)

Importing this package, or pipeline.text.vocab, loads neither Ray nor the readers."""
