"""`specmesh serve` with a tokenizer: chat completions (the chat template), text prompts, stop strings.

The tiny models have no tokenizer, so these tests give the tiny target a byte-level one built in
memory: 256 tokens, one per byte, exactly the tiny vocabulary, with a small chat template.
"""
from __future__ import annotations

import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specmesh.cluster.serve import ServerThread
from specmesh.cluster.serve_app import create_app
from specmesh.runtime import SpecConfig, SpecMesh

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write a poem"}]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ids 0..255), GPT-2's byte-to-character map, no special tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = SpecConfig(target="tiny", draft="tiny-draft", dtype="float32", backend="inproc", num_stages=2,
                     cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=32)
    with SpecMesh(cfg) as e:
        e.backend.tokenizer = byte_tokenizer()
        yield e


@pytest.fixture(scope="module")
def client(engine):
    with ServerThread(create_app(engine, model_name="bytes")) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _template_ids(engine) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


def test_chat_equals_generate_on_the_templated_prompt(client, engine):
    want = engine.generate(_template_ids(engine), gamma=3)
    got = client.chat.completions.create(model="bytes", messages=MESSAGES, extra_body={"gamma": 3})
    choice = got.choices[0]
    assert choice.token_ids == want.output_ids
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert got.object == "chat.completion" and got.usage.prompt_tokens == len(_template_ids(engine))


def test_streamed_chat_equals_generate(client, engine):
    want = engine.generate(_template_ids(engine), temperature=1.0, seed=4)
    chunks = list(client.chat.completions.create(model="bytes", messages=MESSAGES, stream=True,
                                                 temperature=1.0, seed=4))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [t for c in chunks for t in c.choices[0].token_ids] == want.output_ids
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 32


def test_text_prompt_equals_generate(client, engine):
    want = engine.generate("def fib(n):", max_new_tokens=20)
    got = client.completions.create(model="bytes", prompt="def fib(n):", max_tokens=20)
    assert got.choices[0].text == want.text and got.choices[0].token_ids == want.output_ids


def _stop_string(text: str) -> tuple[str, int]:
    """Two characters from the middle of ``text`` that first occur there (and decode cleanly)."""
    for i in range(4, len(text) - 2):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_before_it(client, engine, stream):
    reference = engine.generate("hello", max_new_tokens=32).text
    stop, at = _stop_string(reference)
    out = client.completions.create(model="bytes", prompt="hello", max_tokens=32, stop=[stop, "@@@@"],
                                    stream=stream)
    if stream:
        chunks = list(out)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = out.choices[0].text, out.choices[0].finish_reason
    assert finish == "stop" and text == reference[:at]


def test_missing_chat_template_is_400(client, engine):
    tok = engine.tokenizer
    tok.chat_template = None
    try:
        with pytest.raises(openai.BadRequestError, match="tokenizer of model 'bytes' has no chat template"):
            client.chat.completions.create(model="bytes", messages=MESSAGES)
    finally:
        tok.chat_template = TEMPLATE


def test_non_text_content_is_400(client):
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(openai.BadRequestError, match=r"only text content parts are supported, got \['image_url'\]"):
        client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": image}])
