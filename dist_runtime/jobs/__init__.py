"""Durable document-QA jobs: the SQLite store, its runner (an engine client), submitters and the
Ray service that fronts a job directory."""
