"""Results: the DuckDB schema, ingestion of evaluation cells, read-only queries."""
