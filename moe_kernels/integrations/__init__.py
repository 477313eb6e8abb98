"""Adapters to inference engines (docs/integration.md); each imports its engine lazily."""
