"""Model definitions: one decoder, several checkpoint layouts."""
