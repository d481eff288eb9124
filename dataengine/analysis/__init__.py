"""Reading a run back: Parquet queries over its outputs and the HTML report."""
