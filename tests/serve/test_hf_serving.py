"""`serve.app` given a Hugging Face dir: converted on the fly, served with 2 expert shards, and
chat requests are rendered with the model's own chat template and tokenizer; answers equal
`transformers`' greedy generation."""

from __future__ import annotations

import pytest
import ray
import requests
import torch
from ray import serve

pytest.importorskip("transformers")

from actors.transport import free_port  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from serve.app import build_app  # noqa: E402
from tests.hf_models import CHAT_TEMPLATE, build_hf_model, hf_greedy, hf_tokenizer, save_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-serve")
    mp = pytest.MonkeyPatch()
    mp.setenv("MORAY_HF_CACHE", str(root / "cache"))
    hf = build_hf_model("v3-grouped", seed=4321)
    hf_tok = hf_tokenizer(CHAT_TEMPLATE)
    hf_dir = save_hf_model(hf, root / "hf")
    hf_tok.save_pretrained(hf_dir)
    port = free_port("127.0.0.1")
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(hf_dir), "num_shards": 2}), name="moray-hf", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "hf": hf, "hf_tok": hf_tok, "tok": Tokenizer.load(hf_dir)}
    serve.shutdown()
    ray.shutdown()
    mp.undo()


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hello moray"}],
    [{"role": "system", "content": "moray is a fish"}, {"role": "user", "content": "what is a fish ?"}],
])
def test_chat_uses_the_models_template_and_equals_transformers(server, messages):
    r = requests.post(server["url"] + "/v1/chat/completions", timeout=120,
                      json={"model": "hf", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    hf_tok = server["hf_tok"]
    prompt = hf_tok(hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    expected = hf_greedy(server["hf"], [prompt], 8)[0]
    if hf_tok.eos_token_id in expected:  # the server stops at eos and does not send it
        expected = expected[:expected.index(hf_tok.eos_token_id)]
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == len(expected)
    assert body["choices"][0]["message"]["content"] == server["tok"].decode(expected)
