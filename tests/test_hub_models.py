"""Hugging Face model ids, --download-dir, --tokenizer and --chat-template, without a network: a model id is
read from a Hugging Face cache laid out as huggingface_hub writes it; one that is in no cache names both
ways to get it."""

from __future__ import annotations

import shutil

import pytest

from shardlm import LLM, SamplingParams
from shardlm.common.model_source import ModelNotFoundError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, folder):
    """A Hugging Face cache holding `folder` as repo_id's main revision."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def test_a_model_id_is_read_from_the_hub_cache(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = tiny_models["llama-uneven-tied"]
    cache = hub_cache(tmp_path / "hf", "acme/tiny-llama", folder)
    source = resolve_model("acme/tiny-llama", download_dir=str(cache))
    assert source.kind == "hf" and source.name == "acme/tiny-llama" and COMMIT in source.path
    with LLM("acme/tiny-llama", download_dir=str(cache)) as llm:
        (out,) = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, temperature=0))
        assert len(out.outputs[0].token_ids) == 3


def test_a_model_id_in_no_cache_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (this machine has no route to the Hub either)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("acme/absent", download_dir=str(tmp_path / "empty"))
    text = str(info.value)
    assert "neither in the local Hugging Face cache" in text and "hf download acme/absent" in text
    assert "--download-dir" in text and "local checkpoint folder" in text


def test_tokenizer_and_chat_template_flags(tmp_path):
    """a random model (byte tokenizer) takes a real tokenizer from a folder, and a chat template from a file
    or as text; a template on the byte tokenizer, or one that is neither, is a clear error"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(200)} | {"[UNK]": 200, "</s>": 201}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(tok_dir)
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}w7"
    (tmp_path / "t.jinja").write_text(template)
    for chat_template in (template, str(tmp_path / "t.jinja")):
        with LLM("random:tiny-llama", tokenizer=str(tok_dir), chat_template=chat_template) as llm:
            ids = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "w3 w4"}])
            assert ids == [3, 4, 7]
    from shardlm.common.config import ConfigError

    with pytest.raises(ConfigError, match="needs a real tokenizer"):
        LLM("random:tiny-llama", chat_template=template)
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        LLM("random:tiny-llama", tokenizer=str(tok_dir), chat_template="plain words")
