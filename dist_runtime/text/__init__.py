"""Text in and out: tokenizers, chat templates, incremental detokenization with stop strings,
bundled documents."""
