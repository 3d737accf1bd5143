"""SFT: loss masks from the tokenizer's own chat template, quarantine of bad conversations, packing that
never cuts a conversation, masked tokens that contribute nothing to loss or gradient, the trainer on SFT
data (DP=2 with per-token loss equals one rank), and `make sft-arms` producing both arms, exported and
generating through their chat template."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO, megatron_twin, read_metrics, run_trainer, tiny_hf_dir

from megatron_ext.data import PackedSFTDataset, read_data_json
from preprocessing.errors import BuildError
from preprocessing.chat import check_conversation, encode_sample, render_samples, token_mask

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Sudden aphasia at 9am. Diagnosis?"},
             {"role": "assistant", "content": "<think>\nFocal deficit, sudden onset.\n</think>\n\nIschemic stroke."},
             {"role": "user", "content": "First step?"},
             {"role": "assistant", "content": "Non-contrast CT."}]
LAB_TOOL = [{"type": "function", "function": {"name": "lab_lookup", "description": "A lab value of the patient",
                                              "parameters": {"type": "object", "properties": {"test": {"type": "string"}},
                                                             "required": ["test"]}}}]


@pytest.fixture(scope="module")
def tok():
    from preprocessing.tokenizer import hf_tokenizer

    return hf_tokenizer(str(DEMO / "tokenizer"))


def _masked_text(tok, text: str, spans) -> str:
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    return tok.decode([i for i, m in zip(enc.ids, token_mask(enc.offsets, spans)) if m])


def test_qwen_style_template_splits_turns_and_masks_exactly_the_answers(tok):
    """The demo template shows reasoning only after the last user turn, as Qwen3.5's does: each assistant turn
    becomes a sample whose masked tokens are exactly that turn's completion, reasoning and end-of-turn included."""
    samples, split = render_samples(tok, TWO_TURNS)
    assert split and len(samples) == 2
    first, second = samples
    assert _masked_text(tok, *first) == "Focal deficit, sudden onset.\n</think>\n\nIschemic stroke.<|im_end|>\n"
    assert first[0].endswith("Ischemic stroke.<|im_end|>\n") and "First step?" not in first[0]
    # the second turn's context is the template's own rendering: the first answer without its reasoning
    assert "Focal deficit" not in second[0] and "<|im_start|>assistant\nIschemic stroke.<|im_end|>" in second[0]
    assert _masked_text(tok, *second) == "\n</think>\n\nNon-contrast CT.<|im_end|>\n"
    # everything before the answer, generation prompt included, carries no loss
    enc = tok.backend_tokenizer.encode(second[0], add_special_tokens=False)
    mask = token_mask(enc.offsets, second[1])
    assert tok.decode([i for i, m in zip(enc.ids, mask) if not m]) == tok.apply_chat_template(
        TWO_TURNS[:4], tokenize=False, add_generation_prompt=True)


def test_tool_calls_and_reasoning_reach_the_template(tok):
    """An assistant turn that calls a tool has empty content and its call in tool_calls (the OpenAI and HF format);
    the messages kept only role and content, so it was trained as an empty answer."""
    plain = type(tok).from_pretrained(str(DEMO / "tokenizer"))
    plain.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.reasoning_content %}"
                           "{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}{{ m.content }}"
                           "{% for c in m.tool_calls or [] %}{{ '<tool_call>' + c.function.name + '</tool_call>' }}"
                           "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    call = {"role": "assistant", "content": "", "reasoning_content": "Need the sodium.",
            "tool_calls": [{"type": "function", "function": {"name": "lab_lookup", "arguments": "{}"}}]}
    record = {"messages": [{"role": "user", "content": "Sodium?"}, call,
                           {"role": "tool", "content": "128 mmol/L", "tool_call_id": "1"},
                           {"role": "assistant", "content": "Hyponatraemia."}]}
    messages, reason = check_conversation(record)
    assert reason is None and messages[1] == call
    (text, spans), = render_samples(plain, messages)[0]
    assert [text[a:b] for a, b in spans][0] == "<think>Need the sodium.</think><tool_call>lab_lookup</tool_call><|im_end|>\n"


def test_a_sharegpt_conversation_that_calls_tools_is_read_as_openais_form():
    """LLaMA-Factory's ShareGPT tool format: ``tools`` as JSON text, a ``function_call`` turn holding the call's JSON,
    an ``observation`` turn holding its result; read as the messages and tools of OpenAI's form, which the template
    renders (the test above)."""
    from preprocessing.chat import record_tools

    call = {"name": "lab_lookup", "arguments": {"test": "sodium"}}
    sharegpt = {"tools": json.dumps(LAB_TOOL), "conversations": [
        {"from": "human", "value": "Sodium?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "128 mmol/L"}, {"from": "gpt", "value": "Hyponatraemia."}]}
    assert check_conversation(sharegpt) == ([
        {"role": "user", "content": "Sodium?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "128 mmol/L"}, {"role": "assistant", "content": "Hyponatraemia."}], None)
    assert record_tools(sharegpt) == {"tools": LAB_TOOL} == record_tools({"tools": LAB_TOOL})
    not_json = {**sharegpt, "conversations": [sharegpt["conversations"][0], {"from": "function_call", "value": "lab?"}]}
    assert check_conversation(not_json) == (None, "unknown_role:function_call")
    assert check_conversation({**sharegpt, "tools": "[not json"}) == (None, "bad_tools")


def test_prefix_stable_template_is_one_sample_with_every_answer(tok):
    plain = type(tok).from_pretrained(str(DEMO / "tokenizer"))
    plain.chat_template = CHATML
    samples, split = render_samples(plain, TWO_TURNS)
    assert not split and len(samples) == 1
    text, spans = samples[0]
    assert text == plain.apply_chat_template(TWO_TURNS, tokenize=False) and len(spans) == 2
    assert [text[a:b] for a, b in spans] == [TWO_TURNS[2]["content"] + "<|im_end|>\n", "Non-contrast CT.<|im_end|>\n"]
    # the tokens that carry loss are exactly the two completions: not the next turn's first token after each
    ids, mask = encode_sample(plain.backend_tokenizer, text, spans)
    assert plain.decode([i for i, m in zip(ids, mask) if m]) == "".join(text[a:b] for a, b in spans)
    assert plain.decode([i for i, m in zip(ids, mask) if not m]) == text[: spans[0][0]] + text[spans[0][1] : spans[1][0]]
    (all_text, all_spans), = render_samples(plain, TWO_TURNS, loss_on="all")[0]
    enc = plain.backend_tokenizer.encode(all_text, add_special_tokens=False)
    assert all(token_mask(enc.offsets, all_spans))


def test_template_kwargs_reach_the_template(tok):
    """Like Qwen's enable_thinking=false: the generation prompt pre-closes the think block, so it is context."""
    closing = type(tok).from_pretrained(str(DEMO / "tokenizer"))
    closing.chat_template = CHATML.replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>assistant\\n' }}"
                                           "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    one_turn = TWO_TURNS[:2] + [{"role": "assistant", "content": "<think></think>Stroke."}]
    (text, spans), = render_samples(closing, one_turn, template_kwargs={"enable_thinking": False})[0]
    assert text.endswith("<|im_start|>assistant\n<think></think>Stroke.<|im_end|>\n")
    assert [text[a:b] for a, b in spans] == ["Stroke.<|im_end|>\n"]
    (text, spans), = render_samples(closing, one_turn)[0]
    assert [text[a:b] for a, b in spans] == ["<think></think>Stroke.<|im_end|>\n"]


def test_a_sample_of_seq_length_plus_one_tokens_is_kept_and_one_more_is_too_long(tmp_path, tok):
    """The trainer packs a sample's tokens but its last as inputs: seq_length + 1 tokens fill one row exactly and are
    kept; one token more is quarantined as too long."""
    from datatrove.data import Document

    from preprocessing.build_sft import ChatTokenWriter, SFTRecipe

    messages = TWO_TURNS[:3]
    (text, spans), = render_samples(tok, messages)[0]
    n = len(encode_sample(tok.backend_tokenizer, text, spans)[0])
    for seq_length, kept in ((n - 1, True), (n - 2, False)):
        recipe = SFTRecipe(tokenizer=str(DEMO / "tokenizer"), output_dir=str(tmp_path), paths=[], seq_length=seq_length)
        writer = ChatTokenWriter(str(tmp_path / f"work_{seq_length}"), str(tmp_path / "errors"), str(DEMO / "tokenizer"), recipe)
        doc = Document(text="", id="c", metadata={"messages": messages, "file": "chats.jsonl", "line": 1})
        assert len(list(writer.run([doc]))) == int(kept), (seq_length, n)
        assert ("quarantined/sft/too_long" in writer.stats.stats) == (not kept), (seq_length, n)


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "hello?"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "hi"}]}, "unknown_role:doctor"),
    ({"text": "no conversation"}, "missing_messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "bad_message"),
    ({"messages": [{"role": "assistant", "content": "unprompted"}, {"role": "user", "content": "?"}]}, "assistant_before_user"),
    ({"messages": TWO_TURNS, "tools": {"name": "not a list"}}, "bad_tools"),
    ({"messages": TWO_TURNS, "tools": LAB_TOOL}, None),
    ({"messages": [TWO_TURNS[1], {"role": "assistant", "content": None}]}, "bad_message"),  # null, and no tool call
    ({"messages": TWO_TURNS}, None),
    ({"conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "hello"}]}, None),  # ShareGPT
    ({"conversations": [{"from": "human", "value": "?"}, {"from": "function_call", "value": "{}"}]},
     "unknown_role:function_call"),
    ({"conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": 3}]}, "bad_message"),
    ({"conversations": []}, "missing_messages"),
    ({"instruction": "Define ataxia.", "output": "Loss of coordination."}, None),  # Alpaca
    ({"instruction": "Define ataxia.", "output": ""}, "no_assistant_turn"),
    ({"instruction": "Define ataxia.", "output": None}, "bad_message"),
    ({"instruction": "Define ataxia.", "output": "x", "history": "not pairs"}, "bad_message"),
    ({"instruction": "Define ataxia."}, "missing_messages"),
])
def test_conversation_checks(record, reason):
    assert check_conversation(record)[1] == reason


# TWO_TURNS in the other formats SFT sets come in (ShareGPT's from/value turns, Alpaca's instruction and output with
# the earlier turns as history), and a one-turn Alpaca record with an input, as messages
SHAREGPT = {"system": "Be brief.", "conversations": [
    {"from": "human", "value": TWO_TURNS[1]["content"]}, {"from": "gpt", "value": TWO_TURNS[2]["content"]},
    {"from": "human", "value": TWO_TURNS[3]["content"]}, {"from": "gpt", "value": TWO_TURNS[4]["content"]}]}
ALPACA = {"system": "Be brief.", "history": [[TWO_TURNS[1]["content"], TWO_TURNS[2]["content"]]],
          "instruction": TWO_TURNS[3]["content"], "input": "", "output": TWO_TURNS[4]["content"]}
ALPACA_INPUT = ({"instruction": "Name the lesion.", "input": "Left hemiparesis, aphasia.", "output": "Left MCA."},
                [{"role": "user", "content": "Name the lesion.\nLeft hemiparesis, aphasia."},
                 {"role": "assistant", "content": "Left MCA."}])


def test_sharegpt_and_alpaca_records_are_read_as_their_messages(tmp_path):
    """Medical SFT sets come as ShareGPT or Alpaca records as often as in OpenAI's messages: each is read as the
    conversation it holds, and a build of them gives the same samples, bit for bit, as one of the same conversations
    written as messages."""
    from preprocessing.build_sft import SFTRecipe, build

    assert check_conversation(SHAREGPT) == (TWO_TURNS, None) and check_conversation(ALPACA) == (TWO_TURNS, None)
    assert check_conversation(ALPACA_INPUT[0]) == (ALPACA_INPUT[1], None)
    assert check_conversation({**SHAREGPT, "conversations": [{"from": "system", "value": "Be kind."}, *SHAREGPT[
        "conversations"]]})[0][:2] == [{"role": "system", "content": "Be kind."}, TWO_TURNS[1]]  # its own comes first
    records = {"messages": [{"messages": TWO_TURNS}, {"messages": ALPACA_INPUT[1]}],
               "others": [SHAREGPT, ALPACA_INPUT[0]]}
    built = {}
    for name, lines in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        info = build(SFTRecipe(tokenizer=str(DEMO / "tokenizer"), output_dir="out", paths=["chats.jsonl"],
                               seq_length=256, valid_fraction=0.0, base_dir=str(tmp_path / name)))
        assert info["conversations"]["kept"] == 2 and not info["conversations"]["quarantined"], info
        built[name] = [(tmp_path / name / "out" / f"train_{kind}.bin").read_bytes() for kind in ("tokens", "loss_mask")]
    assert built["others"] == built["messages"] and len(built["messages"][0]) > 0


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from preprocessing.build_sft import SFTRecipe, build

    out = tmp_path_factory.mktemp("sft") / "data"
    build(SFTRecipe.load(DEMO / "sft_recipe.yaml", output_dir=str(out)), workers=2, keep_work=True)  # for the resume test
    return out


def test_build_quarantines_counts_and_resumes(sft_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from preprocessing.build_sft import SFTRecipe, build

    info = read_data_json(sft_data / "sft.json", "build_sft")
    conv = info["conversations"]
    assert conv["quarantined"] == {"no_assistant_turn": 1, "unknown_role:doctor": 1, "too_long": 1, "missing_messages": 1,
                                   "bad_message": 1, "malformed_json": 1}
    assert conv["read"] == 246 and conv["kept"] + conv["heldout"] == 240 and conv["heldout"] > 0
    assert "| unaccounted | 0 |" in (sft_data / "report.md").read_text() and (sft_data / "lengths.png").is_file()
    errors = [json.loads(x) for f in sorted((sft_data / "errors").glob("*.jsonl")) for x in f.read_text().splitlines()]
    assert Counter(e["reason"] for e in errors) == conv["quarantined"]  # one line per quarantined record
    assert all(e["file"].endswith("conversations.jsonl") and e["line"] for e in errors)
    # every multi-turn conversation (1 in 4) became one sample per assistant turn
    assert info["split_into_turns"] == 60 and info["train"]["samples"] + info["valid"]["samples"] == 240 + 60
    for split in ("train", "valid"):
        tokens, masks = IndexedDataset(str(sft_data / f"{split}_tokens")), IndexedDataset(str(sft_data / f"{split}_loss_mask"))
        assert len(tokens) == info[split]["samples"] and np.array_equal(tokens.sequence_lengths, masks.sequence_lengths)
        assert sum(int(masks[i].sum()) for i in range(len(masks))) == info[split]["loss_tokens"] > 0
        assert max(tokens.sequence_lengths) <= info["seq_length"] + 1
    # a rerun resumes from the completion markers: nothing is tokenised again, the outputs are the same
    before = {p.name: p.read_bytes() for p in sft_data.glob("*_*.bin")}
    stamp = (sft_data / "work" / "train_tokens" / "00000.bin").stat().st_mtime_ns
    relative = os.path.relpath(DEMO / "sft_recipe.yaml")  # the same recipe, named from the working directory
    assert build(SFTRecipe.load(relative, output_dir=str(sft_data)), workers=2, keep_work=True)["train"] == info["train"]
    assert (sft_data / "work" / "train_tokens" / "00000.bin").stat().st_mtime_ns == stamp
    assert {p.name: p.read_bytes() for p in sft_data.glob("*_*.bin")} == before
    # --workers sets how many tasks run at once, not the build's task count: resuming with fewer works too
    assert build(SFTRecipe.load(DEMO / "sft_recipe.yaml", output_dir=str(sft_data)), workers=1, keep_work=True)["train"] == info["train"]
    assert (sft_data / "work" / "train_tokens" / "00000.bin").stat().st_mtime_ns == stamp
    # by default work/ (a second copy of every token and mask) is removed after the merge; a rerun of the finished
    # build then returns its sft.json at once, rewriting nothing
    assert build(SFTRecipe.load(DEMO / "sft_recipe.yaml", output_dir=str(sft_data)), workers=2)["train"] == info["train"]
    assert not (sft_data / "work").exists() and not (sft_data / "work.removing").exists()
    merged = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sft_data.glob("*_*.[bi][id][nx]")}
    assert len(merged) == 8 and {name: data for name, (data, _) in merged.items() if name.endswith(".bin")} == before
    assert build(SFTRecipe.load(DEMO / "sft_recipe.yaml", output_dir=str(sft_data)), workers=1) == json.loads(
        (sft_data / "sft.json").read_text())
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sft_data.glob("*_*.[bi][id][nx]")} == merged
    with pytest.raises(BuildError, match="seq_length changed"):  # resuming never mixes outputs of other settings
        build(SFTRecipe.load(DEMO / "sft_recipe.yaml", output_dir=str(sft_data), seq_length=512), workers=2)


def test_every_bad_record_of_a_reason_is_quarantined_once_at_its_line(tmp_path):
    """The demo data holds one bad record per reason, so quarantining only a reason's first record passed: here
    each of the demo's bad records comes three times (twice in one file, once in another, two tasks), and errors/
    holds exactly one line per bad record, at its file and line, as many per reason as the input holds."""
    from preprocessing.build_sft import SFTRecipe, build

    demo = (DEMO / "sft" / "conversations.jsonl").read_text().splitlines()
    reason = {"bad-no-assistant": "no_assistant_turn", "bad-role": "unknown_role:doctor", "bad-too-long": "too_long",
              "bad-no-messages": "missing_messages", "bad-content": "bad_message", "bad-json": "malformed_json"}
    bad = {line: reason[line.split('"')[3]] for line in demo if line.startswith('{"id": "bad-')}  # ids as the demo has them
    good = [line for line in demo if line not in bad]
    assert len(bad) == 6
    files = {"one.jsonl": good[:2] + list(bad) + good[2:4] + list(bad), "two.jsonl": list(bad)[::-1] + good[4:6]}
    placed = []
    for name, lines in files.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        placed += [(name, i, bad[line]) for i, line in enumerate(lines, 1) if line in bad]
    info = build(SFTRecipe(tokenizer=str(DEMO / "tokenizer"), output_dir="out", paths=["*.jsonl"], seq_length=256,
                           base_dir=str(tmp_path)), workers=2)
    errors = [json.loads(x) for f in (tmp_path / "out" / "errors").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert sorted((Path(e["file"]).name, e["line"], e["reason"]) for e in errors) == sorted(placed)
    assert info["conversations"]["quarantined"] == {r: 3 for r in reason.values()}
    assert info["conversations"]["read"] == len(placed) + 6
    assert "| unaccounted | 0 |" in (tmp_path / "out" / "report.md").read_text()


def test_no_surviving_conversation_ends_the_command_with_one_line(tmp_path):
    """Every record bad: the command names the reasons in one line, the traceback only in build_sft.log."""
    (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hello?"}]}\n{"text": "no chat"}\n')
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"tokenizer": str(DEMO / "tokenizer"), "output_dir": "out", "paths": ["chats.jsonl"]}))
    run = subprocess.run([sys.executable, "-m", "preprocessing.build_sft", "--config", str(recipe)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "error: no training conversation survived stage tokenize: source sft: 2 read, removed by read "
        f"(missing_messages: 1), read (no_assistant_turn: 1) (records in {tmp_path / 'out' / 'errors'}); fix the data or "
        "the recipe and rerun with --clean")
    assert "Traceback" in (tmp_path / "out" / "build_sft.log").read_text()


def test_a_rerun_with_another_input_file_stops_naming_it(tmp_path):
    """Files are split over the tasks by their place in the list: a resumed build must read the same files."""
    from preprocessing.build_sft import SFTRecipe, build
    from preprocessing.errors import NoDocuments

    (tmp_path / "a.jsonl").write_text('{"text": "no chat"}\n')
    recipe = SFTRecipe(tokenizer=str(DEMO / "tokenizer"), output_dir="out", paths=["*.jsonl"], base_dir=str(tmp_path))
    with pytest.raises(NoDocuments):
        build(recipe)
    (tmp_path / "b.jsonl").write_text('{"text": "no chat either"}\n')
    with pytest.raises(BuildError, match=r"\(input_files \(added \S+/b\.jsonl\) changed\)"):
        build(recipe)


def _double_newline_tokenizer(directory: Path, chat_template: str | None = None) -> Path:
    """A tokenizer like the demo's, trained on paragraphs, so that it has one token for '\n\n' ('ĊĊ', as Qwen's
    vocabularies have); another chat template if given."""
    from tools.tiny_qwen35 import DEMO_TEXT, write_tokenizer

    write_tokenizer(directory, texts=["\n\n".join(text.rstrip(".") for text in DEMO_TEXT)] * 20)
    assert "ĊĊ" in json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    if chat_template:
        (directory / "chat_template.jinja").write_text(chat_template)
    return directory


def test_a_completion_is_encoded_apart_from_its_prompt_as_serving_sees_it(tmp_path):
    """An answer without reasoning renders '<think>\n' (the generation prompt) then '\n</think>': encoded as one
    text, a '\n\n' token spanned the two, so the training context never matched the prompt a server encodes
    and the completion's first newline got no loss."""
    from preprocessing.tokenizer import hf_tokenizer

    tok = hf_tokenizer(str(_double_newline_tokenizer(tmp_path / "tok")))
    messages = [{"role": "user", "content": "Fever and neck stiffness?"}, {"role": "assistant", "content": "Meningitis."}]
    (text, spans), = render_samples(tok, messages)[0]
    assert tok.convert_tokens_to_ids("ĊĊ") in tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    ids, mask = encode_sample(tok.backend_tokenizer, text, spans)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    served = tok.backend_tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids[:len(served)] == served and not any(mask[:len(served)]) and all(mask[len(served):])
    assert tok.decode(ids[len(served):]) == text[spans[0][0]:] == "\n</think>\n\nMeningitis.<|im_end|>\n"


def test_a_conversation_whose_later_context_encodes_otherwise_is_one_sample_per_turn(tmp_path):
    """A prefix-stable template makes one sample of a conversation, but where a completion starts with a newline
    after the prompt's, the second turn's context encoded whole (as served) differs from the sample's tokens:
    the build makes a sample per turn instead, each starting with its served prompt."""
    from preprocessing.build_sft import SFTRecipe, build

    tokenizer = _double_newline_tokenizer(tmp_path / "tok", CHATML)
    chat = [{"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "\nCheck the neck."},
            {"role": "user", "content": "Stiff?"}, {"role": "assistant", "content": "\nLumbar puncture."}]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"id": "c1", "messages": chat}) + "\n")
    info = build(SFTRecipe(tokenizer=str(tokenizer), output_dir="out", paths=["chats.jsonl"], base_dir=str(tmp_path),
                           valid_fraction=0.0))
    assert info["split_into_turns"] == 1 and info["train"]["samples"] == 2


def test_a_cut_gzip_is_quarantined_and_a_tokenizer_without_chat_template_is_named(tmp_path):
    """A .jsonl.gz cut short by an interrupted copy is one quarantined file (the others build); a base model's
    tokenizer, which has no chat template, stops the build before any work, naming the directory."""
    import gzip

    from preprocessing.build_sft import SFTRecipe, build

    (tmp_path / "good.jsonl").write_text((DEMO / "sft" / "conversations.jsonl").read_text())
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"messages": []}\n' * 200)[:60])
    recipe = {"tokenizer": str(DEMO / "tokenizer"), "output_dir": "out", "paths": ["*.jsonl*"], "seq_length": 256}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    info = build(SFTRecipe.load(tmp_path / "sft.yaml"), workers=1)
    assert info["conversations"]["quarantined"]["unreadable_file"] == 1
    assert "| unaccounted | 0 |" in (tmp_path / "out" / "report.md").read_text()
    errors = [json.loads(x) for f in (tmp_path / "out" / "errors").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert any(e["reason"] == "unreadable_file" and e["file"].endswith("cut.jsonl.gz") and "EOFError" in e["excerpt"]
               for e in errors), errors

    base_tok = shutil.copytree(DEMO / "tokenizer", tmp_path / "base_tokenizer")
    (base_tok / "chat_template.jinja").unlink()
    recipe.update(tokenizer=str(base_tok), output_dir="out_base")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(BuildError, match=f"{base_tok}: the tokenizer has no chat template"):
        build(SFTRecipe.load(tmp_path / "sft.yaml"), workers=1)


def test_a_tokenizer_with_named_templates_builds_and_records_them_whole(tmp_path, tok):
    """Named templates (``chat_template`` a dict: transformers renders with ``default``, with ``tool_use`` for
    conversations with tools): the build renders with them and records one fingerprint of them all, which a change
    to either changes (evaluation compares it)."""
    import copy

    from preprocessing.build_sft import SFTRecipe, build
    from preprocessing.chat import template_sha
    from preprocessing.tokenizer import hf_tokenizer

    named = copy.deepcopy(tok)  # not the module's tokenizer, which other tests use as it is
    named.chat_template = {"default": tok.chat_template, "tool_use": tok.chat_template + "{#- tools -#}"}
    named.save_pretrained(tmp_path / "named")
    assert isinstance(hf_tokenizer(str(tmp_path / "named")).chat_template, dict)
    recipe = {"tokenizer": str(tmp_path / "named"), "output_dir": "out", "paths": [str(DEMO / "sft" / "*.jsonl")],
              "seq_length": 256}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    info = build(SFTRecipe.load(tmp_path / "sft.yaml"), workers=1)
    assert info["chat_template_sha256"] == template_sha(named.chat_template) != template_sha(tok.chat_template)
    assert template_sha({**named.chat_template, "tool_use": tok.chat_template}) != info["chat_template_sha256"]


def _dataset(sft_data, seed=7):
    return PackedSFTDataset(str(sft_data / "train_tokens"), str(sft_data / "train_loss_mask"), 256, pad_id=0, seed=seed)


def test_no_held_out_conversation_is_also_trained_on(sft_data):
    """The demo's conversations repeat (63 distinct in 244 lines), as SFT sets do, and a one-turn conversation renders
    the same sample as the first turn of a longer one; drawn by id, 16 of 17 held-out samples were training samples.
    Drawn by the opening (the messages up to the first user turn), they land on one side."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    train, valid = (IndexedDataset(str(sft_data / f"{split}_tokens")) for split in ("train", "valid"))
    trained = {tuple(train[i].tolist()) for i in range(len(train))}
    assert len(valid) > 0 and not [i for i in range(len(valid)) if tuple(valid[i].tolist()) in trained]


def test_every_epoch_gets_its_own_shuffle_whatever_its_row_count(sft_data):
    """Epochs pack into slightly different row counts; the epoch's seed came from rows // rows_per_epoch, so an
    epoch with fewer rows than the first was followed by the same shuffle again (seen at 20,000 samples)."""
    class Recorded(PackedSFTDataset):
        def _epoch(self, epoch):
            self.seeds = [*getattr(self, "seeds", []), epoch]
            rows = super()._epoch(epoch)
            return rows if epoch == 0 else rows[:-1]  # a later epoch that packs into one row fewer

    ds = Recorded(str(sft_data / "train_tokens"), str(sft_data / "train_loss_mask"), 256, pad_id=0, seed=7)
    ds.resize(4 * ds.rows_per_epoch)
    assert ds.seeds == [0, 1, 2, 3, 4]


def test_packing_keeps_conversations_whole_and_apart(sft_data):
    ds = _dataset(sft_data)
    n = len(ds.tokens)
    epoch0 = [s for row in ds.rows for s in row]
    assert sorted(epoch0) == list(range(n))  # each sample exactly once per epoch
    ds.resize(3 * ds.rows_per_epoch)
    epoch1 = [s for row in ds.rows[ds.rows_per_epoch : 2 * ds.rows_per_epoch] for s in row]
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0  # reshuffled and repacked
    assert ds.rows == _dataset(sft_data).resize(3 * ds.rows_per_epoch).rows  # deterministic
    for i in (0, 5, len(ds) - 1):
        row = ds[i]
        assert row["tokens"].shape == (256,)
        pos = 0
        for s in ds.rows[i]:
            t, m = ds.tokens[s], ds.masks[s]
            k = len(t) - 1
            assert row["tokens"][pos : pos + k].tolist() == t[:-1].tolist()
            assert row["labels"][pos : pos + k].tolist() == t[1:].tolist()
            assert row["loss_mask"][pos : pos + k].tolist() == m[1:].tolist()
            assert row["position_ids"][pos : pos + k].tolist() == list(range(k))  # a new document for the model
            pos += k
        assert row["loss_mask"][pos:].sum() == 0  # padding carries no loss
    fill = sum(len(ds.tokens[s]) - 1 for row in ds.rows[: ds.rows_per_epoch] for s in row) / (256 * ds.rows_per_epoch)
    assert fill > 0.9


def test_masked_tokens_contribute_nothing_to_loss_or_gradient(sft_data):
    """A packed row through megatron's model and the trainer's loss: rewriting every masked label, or every
    token of a conversation that carries no loss, leaves the loss and every gradient bit-identical; rewriting
    one unmasked label changes them (so the check can fail)."""
    from megatron_ext.data import FIELDS, collate
    from megatron_ext.train import forward_step
    from tools.tiny_qwen35 import causal_lm, text_config

    model = megatron_twin(causal_lm(text_config(vocab_size=2048), seed=5))
    ds = _dataset(sft_data)
    i = next(i for i in range(len(ds)) if len(ds.rows[i]) >= 2)
    row = collate([ds[i]])

    def loss_and_grads(batch):
        model.zero_grad()
        output, loss_func = forward_step(iter([batch]), model)
        loss_sum, tokens, _ = loss_func(output)
        (loss_sum / tokens).backward()
        return loss_sum.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads(row)
    masked = row["loss_mask"] == 0
    g = torch.Generator().manual_seed(0)

    relabelled = {**row, "labels": torch.where(masked, torch.randint(0, 2048, row["labels"].shape, generator=g), row["labels"])}
    first_len = len(ds.tokens[ds.rows[i][0]]) - 1
    # the first conversation: no loss, then any tokens at all
    silenced = {k: v.clone() if k in FIELDS else v for k, v in row.items()}
    silenced["loss_mask"][0, :first_len] = 0
    silent_loss, silent_grads = loss_and_grads(silenced)
    silenced["tokens"][0, :first_len] = torch.randint(0, 2048, (first_len,), generator=g)
    silenced["labels"][0, :first_len] = torch.randint(0, 2048, (first_len,), generator=g)
    rewritten_loss, rewritten_grads = loss_and_grads(silenced)
    assert rewritten_loss == silent_loss
    assert all(torch.equal(rewritten_grads[n], silent_grads[n]) for n in silent_grads)

    loss, grads = loss_and_grads(relabelled)
    assert loss == ref_loss and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)

    k = int(torch.nonzero(~masked[0])[0])
    changed = {**row, "labels": row["labels"].clone()}
    changed["labels"][0, k] = (changed["labels"][0, k] + 1) % 2048
    loss, grads = loss_and_grads(changed)
    assert loss != ref_loss and any(not torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random base model with the demo tokenizer and chat template: HF directory + megatron checkpoint."""
    from tools import convert_from_hf

    root = tmp_path_factory.mktemp("sft_base")
    hf = tiny_hf_dir(root / "hf", seed=11)
    convert_from_hf.convert(hf, root / "megatron")
    return root


def _sft_config(root: Path, sft_data: Path, init: Path, run: str, **overrides) -> Path:
    cfg = dict(run_dir=str(root / run), init_from=str(init), sft_data=str(sft_data / "sft.json"), seq_length=256,
               global_batch_size=4, micro_batch_size=1, train_iters=4, per_token_loss=True, lr=1e-3, min_lr=1e-4,
               warmup_fraction=0.25, decay_fraction=0.25, precision="fp32", backend="local", log_interval=1,
               eval_interval=2, save_interval=100, keep_last=1, tensorboard=False)
    cfg.update(overrides)
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_trains_with_per_token_loss_and_dp2_equals_one_rank(sft_data, base, tmp_path):
    """Ranks see different numbers of assistant tokens; with per-token loss the gradient is the mean over all
    of them, so DP=2 must train exactly like one rank accumulating both halves."""
    run_trainer(_sft_config(tmp_path, sft_data, base / "megatron", "one"))
    run_trainer(_sft_config(tmp_path, sft_data, base / "megatron", "dp2"), nproc=2)
    one, dp2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "dp2")
    assert len(one) == len(dp2) == 4
    for x, y in zip(one, dp2):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert ("val/sft" in x) == (x["step"] % 2 == 0)
    assert one[3]["val/sft"] == pytest.approx(dp2[3]["val/sft"], rel=1e-5) and one[3]["val/sft"] < one[1]["val/sft"]
    saved = json.loads((tmp_path / "one" / "config.json").read_text())
    assert saved["sft_data"].endswith("sft.json") and saved["per_token_loss"] is True
    # resume: killed while saving step 4, restarted from step 2's checkpoint, it trains the same rows exactly
    config = _sft_config(tmp_path, sft_data, base / "megatron", "resumed", save_interval=2)
    assert run_trainer(config, "debug={kill_in_save_at_step: 4}", check=False).returncode == -9
    assert "resumed from" in run_trainer(config).stderr
    assert [m["loss"] for m in read_metrics(tmp_path / "resumed")] == [m["loss"] for m in one]


def test_no_validation_split_builds_and_trains_without_validation(base, tmp_path):
    """valid_fraction: 0 (the user evaluates on a separate set): the empty split gets no files and 0 samples in
    sft.json, and SFT trains without validation."""
    from preprocessing.build_sft import SFTRecipe, build

    data = tmp_path / "data"
    sft = build(SFTRecipe.load(DEMO / "sft_recipe.yaml", output_dir=str(data), valid_fraction=0.0))
    assert sft["valid"] == {"tokens_prefix": None, "loss_mask_prefix": None, "samples": 0, "tokens": 0, "max_length": 0,
                            "loss_tokens": 0}
    assert sft["train"]["samples"] == 240 + 60 and sft["conversations"]["heldout"] == 0
    assert not list(data.glob("valid_*")) and "| valid | 0 | 0 | 0 | 0 |" in (data / "report.md").read_text()
    run_trainer(_sft_config(tmp_path, data, base / "megatron", "no_valid", train_iters=2, eval_interval=1))
    metrics = read_metrics(tmp_path / "no_valid")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    assert not any(k.startswith("val/") for m in metrics for k in m)


def test_make_sft_arms_exports_both_arms_that_chat(sft_data, base, tmp_path):
    """`make sft-arms` as a user runs it: SFT data, Base+SFT and CPT+SFT with one config (the "CPT" checkpoint is
    a trained run's checkpoints/ directory), both exported with <|im_end|> as a stop token, both generating
    through the chat template with transformers, with the logits of the trained checkpoints. Each export records how
    its SFT data was rendered (evaluation prompts it so), with a template or without; a model that had no SFT gets
    no record, not even from a template that is an SFT export."""
    from tools.demo import one_node_env
    from tools.verify_conversion import compare

    cpt = tmp_path / "cpt"
    run_trainer(_sft_config(tmp_path, sft_data, base / "megatron", "cpt", train_iters=2, eval_interval=0))
    arms = tmp_path / "arms"
    variables = {"PY": sys.executable, "SFT_DATA_RECIPE": DEMO / "sft_recipe.yaml", "SFT_DATA_DIR": tmp_path / "data",
                 "SFT_CONFIG": ROOT / "launch" / "configs" / "demo_sft_cpu.yaml", "BASE_CKPT": base / "megatron",
                 "CPT_CKPT": cpt / "checkpoints", "HF_TEMPLATE": base / "hf", "ARMS_DIR": arms,
                 "SFT_ARGS": "train_iters=3 eval_interval=3 global_batch_size=4"}
    run = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "sft-arms", *(f"{k}={v}" for k, v in variables.items())],
                         capture_output=True, text=True, env=one_node_env(GPUS_PER_NODE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    configs = {arm: json.loads((arms / arm / "config.json").read_text()) for arm in ("base_sft", "cpt_sft")}
    differing = {k for k in configs["base_sft"] if configs["base_sft"][k] != configs["cpt_sft"][k]}
    assert differing == {"run_dir", "init_from"}  # identical SFT settings
    first = {arm: read_metrics(arms / arm)[0]["loss"] for arm in configs}
    assert first["base_sft"] != first["cpt_sft"]  # they did start from different weights

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arm in configs:
        hf = arms / arm / "hf"
        assert compare(hf, arms / arm / "checkpoints", seq_len=64)["max_rel_err"] < 1e-4
        tok = AutoTokenizer.from_pretrained(hf)
        gen = json.loads((hf / "generation_config.json").read_text())
        assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
        ids = tok.apply_chat_template([{"role": "user", "content": "Sudden aphasia. Diagnosis?"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n<think>\n")
        out = AutoModelForCausalLM.from_pretrained(hf).eval().generate(ids, max_new_tokens=5, do_sample=False)
        assert 0 < out.shape[1] - ids.shape[1] <= 5

    from preprocessing.chat import SFT_CHAT_FILE
    from tools import convert_to_hf

    sft = json.loads((tmp_path / "data" / "sft.json").read_text())
    rendered = {k: sft[k] for k in ("chat_template_kwargs", "chat_template_sha256")}
    plain = convert_to_hf.convert(arms / "cpt_sft" / "checkpoints", tmp_path / "plain")  # no template
    for hf in (arms / "base_sft" / "hf", arms / "cpt_sft" / "hf", plain):
        assert json.loads((hf / SFT_CHAT_FILE).read_text()) == rendered
    assert not (convert_to_hf.convert(base / "megatron", tmp_path / "no_sft", hf_template=arms / "cpt_sft" / "hf") / SFT_CHAT_FILE).exists()


# ------------------------------------------------------------------ the chat templates Qwen's releases ship
# tests/chat_templates/ (sources in its README): every assistant turn's loss covers exactly the completion a server
# would get the model to generate, written out by hand below (not derived by the project's code), and every sample's
# tokens are the template's own rendering of that turn's context, encoded as a server encodes its prompt.

TEMPLATES = ROOT / "tests" / "chat_templates"
SODIUM = {"type": "function", "function": {"name": "lab_lookup", "arguments": {"test": "sodium"}}}
POTASSIUM = {"type": "function", "function": {"name": "lab_lookup", "arguments": {"test": "potassium"}}}
REAL_CHATS = {
    # reasoning as <think> in the content, a system prompt, a later turn without reasoning
    "think_in_content": [{"role": "system", "content": "You are a careful neurologist."},
                         {"role": "user", "content": "Sudden aphasia at 9am. Diagnosis?"},
                         {"role": "assistant", "content": "<think>\nFocal deficit, sudden onset.\n</think>\n\nIschemic stroke."},
                         {"role": "user", "content": "First step?"},
                         {"role": "assistant", "content": "Non-contrast CT."}],
    "reasoning_content": [{"role": "user", "content": "Sodium 128?"},
                          {"role": "assistant", "reasoning_content": "Below 135.", "content": "Hyponatraemia."},
                          {"role": "user", "content": "Cause?"},
                          {"role": "assistant", "reasoning_content": "Think of SIADH.", "content": "Check osmolality."}],
    # a tool call (its content null, as OpenAI's format writes a turn that only calls tools), its response, and the
    # final answer after it (the templates' multi_step_tool rule)
    "tool_call": [{"role": "system", "content": "Use the lab tool."},
                  {"role": "user", "content": "What is the sodium?"},
                  {"role": "assistant", "content": None, "reasoning_content": "Need the lab.", "tool_calls": [SODIUM]},
                  {"role": "tool", "content": "128 mmol/L", "tool_call_id": "1"},
                  {"role": "assistant", "reasoning_content": "It is low.", "content": "Hyponatraemia: 128 mmol/L."}],
    # two calls at once, two responses, an answer without reasoning, then a new question
    "two_calls": [{"role": "user", "content": "Sodium and potassium?"},
                  {"role": "assistant", "content": "Looking both up.", "tool_calls": [SODIUM, POTASSIUM]},
                  {"role": "tool", "content": "128"}, {"role": "tool", "content": "4.1"},
                  {"role": "assistant", "content": "Na 128, K 4.1."},
                  {"role": "user", "content": "So?"},
                  {"role": "assistant", "content": "<think>\nLow sodium.\n</think>\n\nHyponatraemia."}],
    "empty_and_unicode": [{"role": "user", "content": "Ça va? 脑卒中 🧠"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "Encore?"},
                          {"role": "assistant", "content": "<think>\nÉcho 🧠\n</think>\n\nOui — 脑卒中."}],
}
TOOLS_OF = {"tool_call": LAB_TOOL, "two_calls": LAB_TOOL}
QWEN3_CALL = '<tool_call>\n{{"name": "lab_lookup", "arguments": {{"test": "{}"}}}}\n</tool_call>'
QWEN35_CALL = "<tool_call>\n<function=lab_lookup>\n<parameter=test>\n{}\n</parameter>\n</function>\n</tool_call>"
END = "<|im_end|>\n"
# per conversation: whether it is one sample, and each assistant turn's completion, by hand from the templates' text
QWEN3_EXPECTED = {  # the generation prompt is '<|im_start|>assistant\n': the think block is generated, empty or not
    "think_in_content": (False, ["<think>\nFocal deficit, sudden onset.\n</think>\n\nIschemic stroke." + END,
                                 "<think>\n\n</think>\n\nNon-contrast CT." + END]),
    "reasoning_content": (False, ["<think>\nBelow 135.\n</think>\n\nHyponatraemia." + END,
                                  "<think>\nThink of SIADH.\n</think>\n\nCheck osmolality." + END]),
    "tool_call": (True, ["<think>\nNeed the lab.\n</think>\n\n" + QWEN3_CALL.format("sodium") + END,
                         "<think>\nIt is low.\n</think>\n\nHyponatraemia: 128 mmol/L." + END]),
    "two_calls": (False, ["<think>\n\n</think>\n\nLooking both up.\n" + QWEN3_CALL.format("sodium") + "\n"
                          + QWEN3_CALL.format("potassium") + END,
                          "<think>\n\n</think>\n\nNa 128, K 4.1." + END,
                          "<think>\nLow sodium.\n</think>\n\nHyponatraemia." + END]),
    "empty_and_unicode": (False, ["<think>\n\n</think>\n\n" + END, "<think>\nÉcho 🧠\n</think>\n\nOui — 脑卒中." + END]),
}
QWEN35_EXPECTED = {  # the generation prompt opens the think block: '<|im_start|>assistant\n<think>\n'
    "think_in_content": (False, ["Focal deficit, sudden onset.\n</think>\n\nIschemic stroke." + END,
                                 "\n</think>\n\nNon-contrast CT." + END]),
    "reasoning_content": (False, ["Below 135.\n</think>\n\nHyponatraemia." + END,
                                  "Think of SIADH.\n</think>\n\nCheck osmolality." + END]),
    "tool_call": (True, ["Need the lab.\n</think>\n\n" + QWEN35_CALL.format("sodium") + END,
                         "It is low.\n</think>\n\nHyponatraemia: 128 mmol/L." + END]),
    "two_calls": (False, ["\n</think>\n\nLooking both up.\n\n" + QWEN35_CALL.format("sodium") + "\n"
                          + QWEN35_CALL.format("potassium") + END,
                          "\n</think>\n\nNa 128, K 4.1." + END, "Low sodium.\n</think>\n\nHyponatraemia." + END]),
    "empty_and_unicode": (False, ["\n</think>\n\n" + END, "Écho 🧠\n</think>\n\nOui — 脑卒中." + END]),
}
REAL_TEMPLATE_CASES = [("qwen3.jinja", {}, QWEN3_EXPECTED), ("qwen3.jinja", {"enable_thinking": True}, QWEN3_EXPECTED),
                       ("qwen3.5.jinja", {}, QWEN35_EXPECTED),
                       ("qwen3.5-small.jinja", {"enable_thinking": True}, QWEN35_EXPECTED)]


@pytest.fixture(scope="module")
def real_tokenizer_dir(tmp_path_factory):
    """The demo's kind of tokenizer with a '\n\n' token (as Qwen's vocabularies have) and the tokens Qwen3/3.5 add
    beside <think> and </think> (added, not special, as in the releases); each test sets its chat template."""
    from preprocessing.tokenizer import hf_tokenizer

    directory = _double_newline_tokenizer(tmp_path_factory.mktemp("qwen_tok") / "tok")
    tok = hf_tokenizer(str(directory))
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.save_pretrained(directory)
    return directory


def _real_tokenizer(directory: Path, template: str, out: Path) -> Path:
    shutil.copytree(directory, out)
    (out / "chat_template.jinja").write_text((TEMPLATES / template).read_text())
    return out


def _build_chats(tokenizer: Path, root: Path, chats: dict, template_kwargs: dict,
                 quarantined: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """build_sft on ``chats`` (one record each, with its tools), in order: every sample's (tokens, loss mask); the
    build quarantines ``quarantined`` (reason: count), by default nothing."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from preprocessing.build_sft import SFTRecipe, build

    lines = [{"id": name, "messages": chat, **({"tools": TOOLS_OF[name]} if name in TOOLS_OF else {})}
             for name, chat in chats.items()]
    (root / "chats.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    info = build(SFTRecipe(tokenizer=str(tokenizer), output_dir="out", paths=["chats.jsonl"], base_dir=str(root),
                           valid_fraction=0.0, chat_template_kwargs=template_kwargs))
    assert info["conversations"]["quarantined"] == (quarantined or {}), info["conversations"]
    tokens, masks = IndexedDataset(str(root / "out" / "train_tokens")), IndexedDataset(str(root / "out" / "train_loss_mask"))
    return [(tokens[i].tolist(), masks[i].tolist()) for i in range(len(tokens))]


@pytest.mark.parametrize("template, kwargs, expected", REAL_TEMPLATE_CASES,
                         ids=[f"{t}-{k or 'default'}" for t, k, _ in REAL_TEMPLATE_CASES])
def test_real_templates_mask_exactly_each_turns_completion_in_its_served_context(real_tokenizer_dir, tmp_path,
                                                                                   template, kwargs, expected):
    """Each conversation through build_sft with a released template: the samples come in order (one per
    conversation, or one per assistant turn where the template hides earlier reasoning); each turn's served prompt
    (the template's rendering of the turn's context with the generation prompt, tools included, encoded alone) is a
    prefix of its sample and carries no loss; the tokens after it are the completion written out above and carry
    loss, through <|im_end|>; nothing else does."""
    from transformers import AutoTokenizer

    tokenizer = _real_tokenizer(real_tokenizer_dir, template, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    encode = lambda text: tok.backend_tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    samples = iter(_build_chats(tokenizer, tmp_path, REAL_CHATS, kwargs))
    for name, chat in REAL_CHATS.items():
        one_sample, completions = expected[name]
        chat = [{**m, "content": m["content"] or ""} for m in chat]  # a null content is read as "" (OpenAI's format)
        turns = list(zip([i for i, m in enumerate(chat) if m["role"] == "assistant"], completions, strict=True))
        render = functools.partial(tok.apply_chat_template, tokenize=False, tools=TOOLS_OF.get(name), **kwargs)
        for group in [turns] if one_sample else [[turn] for turn in turns]:
            ids, mask = next(samples)
            # the template's own text of the conversation up to the (last) trained turn, tools and system prompt included
            assert tok.decode(ids) == render(chat[: group[-1][0] + 1]), name
            for i, completion in group:
                prompt, wanted = encode(render(chat[:i], add_generation_prompt=True)), encode(completion)
                assert ids[:len(prompt)] == prompt, (name, i)  # the served prompt's tokens
                assert ids[len(prompt):len(prompt) + len(wanted)] == wanted, (name, i, tok.decode(ids[len(prompt):]))
            # the loss covers the completions and nothing else: no system, user, tool or generation-prompt token
            assert tok.decode([t for t, m in zip(ids, mask) if m]) == "".join(c for _, c in group), name
            if name in TOOLS_OF:
                context = tok.decode([t for t, m in zip(ids, mask) if not m])
                assert "<tools>" in context and '"description": "A lab value of the patient"' in context, name
    assert next(samples, None) is None


@pytest.mark.parametrize("template, kwargs", [("qwen3.5-small.jinja", {}), ("qwen3.5.jinja", {"enable_thinking": False}),
                                              ("qwen3.jinja", {"enable_thinking": False})])
def test_real_templates_without_thinking_train_the_answer_and_refuse_reasoning(real_tokenizer_dir, tmp_path, template,
                                                                                 kwargs):
    """A generation prompt that closes the think block ('<think>\n\n</think>\n\n': Qwen3.5-0.8B and -2B's default,
    enable_thinking false elsewhere) is context; a turn without reasoning trains just its answer. A turn with
    reasoning cannot follow that prompt: its conversation is quarantined, the reason naming enable_thinking."""
    from transformers import AutoTokenizer

    tokenizer = _real_tokenizer(real_tokenizer_dir, template, tmp_path / "tok")
    plain = [{"role": "user", "content": "Fever and neck stiffness?"}, {"role": "assistant", "content": "Meningitis."}]
    (ids, mask), = _build_chats(tokenizer, tmp_path, {"plain": plain, "reasoning": REAL_CHATS["reasoning_content"]},
                                kwargs, quarantined={"template_error": 1})
    tok = AutoTokenizer.from_pretrained(tokenizer)
    assert tok.decode([t for t, m in zip(ids, mask) if not m]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Meningitis.<|im_end|>\n"
    errors = [json.loads(x) for f in (tmp_path / "out" / "errors").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert [e["line"] for e in errors] == [2] and "enable_thinking" in errors[0]["excerpt"], errors
    # evaluation prompts as training did (eval_reasoning_judge --answer-template-kwargs): sft.json says how
    assert json.loads((tmp_path / "out" / "sft.json").read_text())["chat_template_kwargs"] == kwargs
