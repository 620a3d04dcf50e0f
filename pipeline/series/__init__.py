"""Numeric time series: checked reading, `prepare_series` and `PreparedSeries`."""
