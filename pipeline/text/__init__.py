"""Text corpora: vocabulary, byte ranges, `prepare` and `PreparedDataset`."""
