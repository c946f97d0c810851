"""Shared test helpers: reference models built with Hugging Face transformers."""
