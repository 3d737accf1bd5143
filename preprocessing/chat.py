"""Chat conversations -> training text and the character spans that carry loss, through the tokenizer's
own chat template (so SFT sees exactly what the model sees when it is served).

A turn's completion is what the template renders for that assistant message after the generation prompt
(``render(messages[:i], add_generation_prompt=True)``), end-of-turn marker included, so the model learns
to stop. Templates like Qwen3.5's show an assistant turn's ``<think>`` reasoning only when no user
message follows it: rendered as a whole, earlier turns lose their reasoning. When the whole rendering
contains every turn exactly as rendered on its own, a conversation is one sample with every assistant
span trained; otherwise each assistant turn becomes its own sample (its context as the template renders
it at that point), so no reasoning is trained out of context and none is dropped.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("assistant", "all")

Spans = list[tuple[int, int]]


# ShareGPT's speakers (a turn's ``from``), as FastChat and LLaMA-Factory write them, and the roles they are
# (LLaMA-Factory's "function_call" turns are assistant turns that call tools: :func:`_sharegpt_turn`)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "observation": "tool", "tool": "tool"}


def _sharegpt_turn(turn: Any) -> Any:
    """One ShareGPT turn as a message. A ``function_call`` turn's value is the JSON of a call ``{"name",
    "arguments"}`` or a list of them: an assistant message with those ``tool_calls`` (OpenAI's form), or kept by its
    speaker's name where it is not such JSON (an unknown role then)."""
    if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)):
        return turn
    speaker, value = turn["from"], turn.get("value")
    if speaker == "function_call" and isinstance(value, str):
        try:
            calls = json.loads(value)
        except ValueError:
            calls = None
        calls = [calls] if isinstance(calls, dict) else calls
        if isinstance(calls, list) and calls and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                     for c in calls):
            return {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": call} for call in calls]}
    return {"role": SHAREGPT_ROLES.get(speaker, speaker), "content": value}


def _tools(record: dict) -> Any:
    """A record's ``tools``: a list, or the JSON text of one (as LLaMA-Factory and many function-calling sets keep
    it); what is neither comes back as it is, for :func:`check_conversation` to refuse."""
    tools = record.get("tools") or []
    if isinstance(tools, str):
        try:
            return json.loads(tools)
        except ValueError:
            return tools
    return tools


def as_messages(record: Any) -> Any:
    """A record's conversation as OpenAI-style ``messages``, whichever of the formats SFT sets come in it has:
    ``messages`` itself; ShareGPT's ``conversations`` of ``{"from", "value"}`` turns (speakers by
    :data:`SHAREGPT_ROLES` and :func:`_sharegpt_turn`, another kept by its name; a ``system`` beside them opens the
    conversation; ``tools`` may be JSON text, :func:`_tools`); Alpaca's ``instruction`` and ``output`` (the user turn
    is the instruction, then a line break and the ``input`` if any, as LLaMA-Factory joins them; ``system`` and
    ``history``, ``[[question, answer], ...]``, before it). None for a record of none of them. Only the shape is
    converted: :func:`check_conversation` judges what comes out."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return record["messages"]
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if isinstance(record.get("conversations"), list):
        turns = [_sharegpt_turn(t) for t in record["conversations"]]
        opens_with_system = turns and isinstance(turns[0], dict) and turns[0].get("role") == "system"
        return turns if opens_with_system else system + turns
    if "instruction" in record and "output" in record:
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
            return [history]  # not a list of [question, answer] pairs: a bad message
        prompt, extra = record["instruction"], record.get("input")
        if isinstance(prompt, str) and isinstance(extra, str) and extra:
            prompt = f"{prompt}\n{extra}"
        return system + [{"role": role, "content": text} for q, a in history + [[prompt, record["output"]]]
                         for role, text in (("user", q), ("assistant", a))]
    return None


def check_conversation(record: Any, roles: tuple[str, ...] | list[str] = ROLES) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a usable record (in any format :func:`as_messages` reads), else (None, reason) with a
    short, countable reason. A record's ``tools`` (the function definitions, beside ``messages`` as in OpenAI's
    format) must be a list of objects: the template renders them into the system prompt (:func:`record_tools`)."""
    messages = as_messages(record)
    if not isinstance(messages, list) or not messages:
        return None, "missing_messages"
    tools = _tools(record)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return None, "bad_tools"
    # OpenAI's format writes an assistant turn that only calls tools with "content": null; the templates take ""
    messages = [{**m, "content": ""} if isinstance(m, dict) and m.get("role") == "assistant" and m.get("content") is None
                and m.get("tool_calls") else m for m in messages]
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, "bad_message"
        if m["role"] not in roles:
            return None, f"unknown_role:{m['role'][:20]}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no_assistant_turn"
    first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:first_assistant]):
        return None, "assistant_before_user"
    return messages, None  # every field as given: the template renders tool_calls, reasoning_content, names


def record_tools(record: dict) -> dict:
    """The template arguments a record brings: its ``tools``, if any. A conversation that calls tools was written
    with their definitions in the prompt (Qwen's templates put them in the system turn); trained without them,
    the model would learn to call functions nobody declared, and serving, which renders them, would differ."""
    tools = _tools(record)
    return {"tools": tools} if tools else {}


def render_samples(tokenizer, messages: list[dict], loss_on: str = "assistant",
                   template_kwargs: dict | None = None, per_turn: bool = False) -> tuple[list[tuple[str, Spans]], bool]:
    """([(text, loss spans)], split_into_turns). ``template_kwargs`` go to the template (e.g. Qwen's
    ``enable_thinking``); ``per_turn``: one sample per assistant turn even where one would hold them all. Raises
    ValueError when the template renders a turn in a way no prefix rule can follow (the record is quarantined
    with that message)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                             **(template_kwargs or {}))

    full = render(messages)
    if loss_on == "all":
        return [(full, [(0, len(full))])], False
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, alone = render(messages[:i], True), render(messages[: i + 1])
        if not alone.startswith(prompt):
            raise ValueError(f"turn {i}: the template's rendering of the turn does not start with its generation prompt"
                             " (a prompt that closes the think block before a turn with reasoning? Qwen's with "
                             "enable_thinking false, as Qwen3.5-0.8B and -2B's template does unless it is true)")
        turns.append((prompt, alone[len(prompt):]))
    if not per_turn and all(full.startswith(p) and full.startswith(c, len(p)) for p, c in turns):
        return [(full, [(len(p), len(p) + len(c)) for p, c in turns])], False
    return [(p + c, [(len(p), len(p) + len(c))]) for p, c in turns], True


def encode_sample(backend, text: str, spans: Spans) -> tuple[list[int], list[int]] | None:
    """(token ids, loss mask) of a rendered sample, as serving sees it: the text before each completion is encoded
    on its own (a server encodes the prompt alone and the model generates the completion after it), so no token
    spans the boundary (Qwen's vocabulary has '\n\n': the generation prompt's '<think>\n' and a completion's
    '\n</think>' would share one, and the completion's first newline would be context). None when a later turn's
    context, encoded whole as serving encodes it, differs from the sample's tokens before that turn: such a
    conversation must be split into one sample per turn. ``backend``: a Rust ``tokenizers.Tokenizer``."""
    starts = sorted(start for start, _ in spans)
    cuts = sorted({0, *starts, len(text)})
    ids, offsets = [], []
    for a, b in zip(cuts, cuts[1:]):
        enc = backend.encode(text[a:b], add_special_tokens=False)
        ids += enc.ids
        offsets += [(a + s, a + e) for s, e in enc.offsets]
    for start in starts[1:]:
        before = sum(1 for s, _ in offsets if s < start)
        if backend.encode(text[:start], add_special_tokens=False).ids != ids[:before]:
            return None
    return ids, token_mask(offsets, spans)


def token_mask(offsets: list[tuple[int, int]], spans: Spans) -> list[int]:
    """1 for every token that starts inside a loss span (offsets: the fast tokenizer's character offsets)."""
    mask, k = [], 0
    for start, _ in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(int(k < len(spans) and spans[k][0] <= start))
    return mask


# in a checkpoint's hf_source/ and in its HF export: how an SFT run's conversations were rendered (the data's
# chat_template_kwargs and template_sha), so that evaluation prompts the model as it was trained
SFT_CHAT_FILE = "neurocpt_sft_chat.json"


def template_sha(template: str | dict[str, str]) -> str:
    """A chat template's short fingerprint: ``sft.json`` records the one its conversations were rendered with, and
    evaluation compares it with the template of the model it prompts. A tokenizer with named templates (a dict:
    transformers renders with ``default``, or ``tool_use`` for conversations with tools) is fingerprinted whole."""
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
