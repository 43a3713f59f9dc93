from pathlib import Path

import pytest

AZURE_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "azure-llm-2023"
CONV = AZURE_DIR / "AzureLLMInferenceTrace_conv.csv"
CODE = AZURE_DIR / "AzureLLMInferenceTrace_code.csv"


@pytest.fixture
def write(tmp_path):
    """Write text to a file under tmp_path and return its path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write
