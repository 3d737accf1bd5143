"""What reaches the model's chat template and the structured-output request, per backend: the OpenAI client
against a real local server (tools/openai_stub_server.py), and the vLLM backend against a stand-in ``vllm``
package with vLLM 0.33's call signatures (no GPU, no vLLM here)."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from preprocessing.llm import LLMConfig, Request, StructuredLLM, VLLMBackend
from tools.openai_stub_server import StubServer

KEY_ENV = "NEUROCPT_TEST_LLM_KEY"
SCHEMA = {"type": "object", "properties": {"decision": {"enum": ["keep", "drop"]}}, "required": ["decision"]}


def _request(i: int = 0) -> Request:
    doc = ("Patients with acute stroke received clinical treatment on a dedicated hospital unit, and their outcomes "
           "at one year improved compared with care on general wards.")
    return Request(f"k{i}", f"Classify.\n<document>\n{doc}\n</document>", SCHEMA, "classify", ref=f"doc {i}")


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}])
def test_openai_backend_sends_chat_template_kwargs_only_when_set(kwargs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "EMPTY")
    server = StubServer()
    try:
        config = LLMConfig(model="stub", base_url=server.url, api_key_env=KEY_ENV, chat_template_kwargs=kwargs)
        result = StructuredLLM(config, cache=None).call(_request())
    finally:
        server.close()
    assert result.output is not None and result.output["decision"] == "keep"
    (request,) = server.requests
    assert request["body"].get("chat_template_kwargs") == kwargs  # None: not in the body (the OpenAI API refuses it)


class FakeLLM:
    """``vllm.LLM`` with the parts of vLLM 0.33's signatures the backend uses (an unknown keyword fails)."""

    def __init__(self, model, *, tensor_parallel_size=1, seed=0, gpu_memory_utilization=0.92, **engine_args):
        self.model, self.chats = model, []

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, priority=None, chat_template=None,
             chat_template_content_format="auto", add_generation_prompt=True, continue_final_message=False, tools=None,
             chat_template_kwargs=None, tokenization_kwargs=None, mm_processor_kwargs=None):
        self.chats.append({"messages": messages, "sampling_params": sampling_params,
                           "chat_template_kwargs": chat_template_kwargs})
        answer = json.dumps({"decision": "keep"})
        return [SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(text=answer, token_ids=[4, 5])])
                for _ in messages]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm, sampling = types.ModuleType("vllm"), types.ModuleType("vllm.sampling_params")
    vllm.LLM, vllm.sampling_params = FakeLLM, sampling
    sampling.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    sampling.StructuredOutputsParams = lambda json=None: SimpleNamespace(json=json)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)


@pytest.mark.parametrize("recipe, sent", [(None, {"enable_thinking": False}),  # Qwen3: answer at once, in JSON
                                          ({"enable_thinking": True}, {"enable_thinking": True})])
def test_vllm_backend_turns_thinking_off_unless_the_recipe_says_otherwise(fake_vllm, recipe, sent):
    config = LLMConfig(model="Qwen/Qwen3-32B", backend="vllm", chat_template_kwargs=recipe, max_tokens=64)
    llm = StructuredLLM(config, cache=None)
    results = llm.run([_request(0), _request(1)])
    assert [r.output for r in results] == [{"decision": "keep"}] * 2
    (chat,) = llm.backend.llm.chats  # one batched call
    assert chat["chat_template_kwargs"] == sent
    assert [p.structured_outputs.json for p in chat["sampling_params"]] == [SCHEMA, SCHEMA]
    assert chat["sampling_params"][0].max_tokens == 64
    assert llm.usage["prompt_tokens"] == 6 and llm.usage["completion_tokens"] == 4
    assert isinstance(llm.backend, VLLMBackend)


def test_cached_answers_keep_what_they_cost(fake_vllm, tmp_path):
    """A resumed run reports the tokens of the answers it takes from the cache (as spent when they were made)
    beside its own calls' tokens."""
    from preprocessing.llm import JsonlCache

    config = LLMConfig(model="Qwen/Qwen3-32B", backend="vllm", max_tokens=64)
    StructuredLLM(config, JsonlCache(tmp_path / "c.jsonl")).run([_request(0), _request(1)])
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write(json.dumps({"key": "k2", "output": {"decision": "drop"}, "error": None}) + "\n")
    resumed = StructuredLLM(config, JsonlCache(tmp_path / "c.jsonl"))
    assert [r.output["decision"] for r in resumed.run([_request(i) for i in range(4)])] == ["keep", "keep", "drop", "keep"]
    u = resumed.usage
    assert (u["calls"], u["prompt_tokens"], u["completion_tokens"]) == (1, 3, 2)  # this run: request 3
    assert (u["cached"], u["cached_calls"], u["cached_prompt_tokens"], u["cached_completion_tokens"]) == (3, 2, 6, 4)
    assert u["cached_without_usage"] == 1  # k2: written before entries kept their usage
