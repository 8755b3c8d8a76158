"""The real SmolLM2 model (float32, on CPU) for the blend tests, loaded once per session."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from polarkvd.models import ModelError, ensure_smollm2

    try:
        path = ensure_smollm2()
    except ModelError as e:
        pytest.skip(f"SmolLM2 model not available: {e}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


#: Three short "documents" and a question: real text, so attention between chunks matters.
DOCS = [
    "The Nile is the longest river in Africa. It flows north through eleven countries, from the "
    "lakes of East Africa to the Mediterranean Sea, and its delta feeds most of Egypt's farms. ",
    "Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa. Its summit, Uhuru Peak, is "
    "5,895 metres above sea level, and its glaciers have been shrinking for a century. ",
    "The Sahara is the largest hot desert in the world. It covers most of North Africa, and its "
    "dunes can rise more than 180 metres; rain falls there only a few days a year. ",
]
#: The chat turn around them (SmolLM2-Instruct answers in its chat format).
PREFIX = "<|im_start|>user\nRead these notes.\n"
QUESTION = "\nWhich river flows into the Mediterranean Sea?<|im_end|>\n<|im_start|>assistant\n"
