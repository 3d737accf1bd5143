"""The MTP head's next-next-token accuracy (evaluation.mtp): the forward is wired as serving engines run it
(embedding of token i+1 first, then the hidden state i, predicting token i+2), and the report shows it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from evaluation import mtp, report
from evaluation.common import FinishedUnits, ModelFailed
from tools.tiny_qwen35 import add_mtp, causal_lm, multimodal, text_config, write_tokenizer


def _copy_head(model) -> mtp.MTPHead:
    """An MTP head that predicts its input token again: fc keeps the (normed) embedding half, the layer adds
    nothing (zero output projections), the norms are plain (zero-centred weights) except the hidden states' own
    pre-fc norm, which scales by 1 + w = 0: a head that put the embeddings through it (the two pre-fc norms
    swapped) sees nothing and predicts nothing."""
    config = model.config
    head = mtp.MTPHead(config).double().eval()
    h = config.hidden_size
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.fc.weight[:, :h] = torch.eye(h, dtype=torch.float64)
        head.pre_fc_norm_hidden.weight.fill_(-1.0)
    return head


def test_copy_head_scores_exactly_the_repeated_tokens():
    model = causal_lm(text_config(tie_word_embeddings=True), seed=3).double()
    with torch.no_grad():  # token t embeds as 10 * e_t: the tied LM head maps 8 * e_t back to t
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:64] = 10 * torch.eye(64, dtype=torch.float64)
    ids = [t for t in (5, 9, 13, 2, 40, 7, 21, 33, 60, 11) for _ in range(2)]  # pairs: x x y y z z ...
    main_hits, mtp_hits, n = mtp.document_hits(model, _copy_head(model), ids, vocab=96, device="cpu")
    # position i gets token i+1 and predicts it again; token i+2 equals it for every odd i: 9 of 18
    assert (n, mtp_hits) == (18, 9)
    # the main model on the same positions, from transformers' own forward: the large embeddings dominate
    # the residual stream, so it too predicts its input token again, right at every other position
    with torch.no_grad():
        predicted = model(torch.tensor([ids])).logits[0, :, :96].argmax(-1).tolist()
    assert main_hits == sum(predicted[j] == ids[j + 1] for j in range(1, len(ids) - 1)) == 9


def test_padded_ids_are_never_the_prediction():
    model = causal_lm(text_config(tie_word_embeddings=True), seed=3).double()
    with torch.no_grad():  # ids 90..95 would win every argmax, but the tokenizer has only 90
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:64] = torch.eye(64, dtype=torch.float64)
        model.model.embed_tokens.weight[90:] = 100.0
    ids = [t for t in (5, 9, 13, 2) for _ in range(2)]
    _, hits, n = mtp.document_hits(model, _copy_head(model), ids, vocab=90, device="cpu")
    assert (n, hits) == (6, 3)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp") / "hf"
    multimodal(seed=2, tie_word_embeddings=True, vocab_size=640).save_pretrained(d)
    write_tokenizer(d)
    add_mtp(d, seed=2)
    return d


def test_evaluate_counts_every_position_and_the_report_shows_it(release, tmp_path):
    """The positions and documents each model is scored on (what they score is the copy-head tests' subject:
    random models score about nothing)."""
    texts = ["The patient presented with acute ischemic stroke.", "Neurons in the hippocampus encode place and time."]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = mtp.evaluate({"base": str(release), "cpt": str(release)}, {"EHR": str(data)}, max_length=8, device="cpu")
    from transformers import AutoTokenizer

    lengths = [min(len(AutoTokenizer.from_pretrained(release)(t).input_ids), 8) for t in texts]
    row = result["results"]["EHR"]
    for name in ("base", "cpt"):
        assert (row[name]["positions"], row[name]["documents"]) == (sum(n - 2 for n in lengths), 2), name
    (tmp_path / "mtp.json").write_text(json.dumps(result))
    text = report.build(tmp_path, tmp_path / "report.md")
    assert "## MTP head: next-next-token accuracy" in text and "| EHR |" in text


def test_a_checkpoint_without_mtp_head_is_named(tmp_path):
    causal_lm(text_config(), seed=1).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="no MTP head"):
        mtp.mtp_state(tmp_path / "hf")


def test_a_domain_without_a_scorable_position_is_named(release, tmp_path):
    (tmp_path / "short.jsonl").write_text('{"text": ""}\n{"text": "a"}\n')  # no token has two before it
    with pytest.raises(ModelFailed, match=r"model base .*short\.jsonl \(domain 'tiny'\): no document has three tokens"):
        mtp.evaluate({"base": str(release)}, {"tiny": str(tmp_path / "short.jsonl")}, device="cpu")


@pytest.mark.parametrize("data, needle", [(b'{"text": 3}\n', r"d\.jsonl:1: not a jsonl record with a 'text'"),
                                          (b'{"text": "caf\xe9"}\n', r"d\.jsonl:1: not UTF-8 text"),
                                          (None, r"No such file or directory: '.*d\.jsonl'")],
                         ids=["wrong type", "Latin-1 byte", "no file"])
def test_the_command_names_a_bad_data_file_in_one_line(data, needle, tmp_path):
    """A bad or missing data file stops the command with one line naming it (and the line), not a traceback."""
    if data is not None:
        (tmp_path / "d.jsonl").write_bytes(data)
    with pytest.raises(SystemExit) as err:
        mtp.main(["--model", f"base={tmp_path / 'no-model'}", "--data", f"d={tmp_path / 'd.jsonl'}",
                  "--out", str(tmp_path / "mtp"), "--device", "cpu"])
    assert re.fullmatch("mtp: .*" + needle + ".*", str(err.value))


def test_a_killed_evaluation_resumes_with_only_what_is_left(release, tmp_path, monkeypatch, capsys):
    """Interrupted in the middle (the third of four (model, domain) units raises), the run keeps the two finished in
    OUT.units.json and writes no report; the rerun computes only the other two and reports exactly what an
    uninterrupted run does. A checkpoint written again under the same path is computed again."""
    import shutil

    cpt = tmp_path / "cpt"
    shutil.copytree(release, cpt)
    data = {}
    for d, texts in (("notes", ["The patient presented with acute ischemic stroke.", "No focal deficit on exam."]),
                     ("web", ["Neurons in the hippocampus encode place and time.", "Sleep consolidates memory."])):
        data[d] = tmp_path / f"{d}.jsonl"
        data[d].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def argv(out):
        return ["--model", f"base={release}", "--model", f"cpt={cpt}", "--data", f"notes={data['notes']}",
                "--data", f"web={data['web']}", "--max-length", "8", "--device", "cpu", "--out", str(tmp_path / out)]

    mtp.main(argv("whole"))  # uninterrupted
    whole = json.loads((tmp_path / "whole.json").read_text())
    scored, real = [], mtp.domain_accuracy

    def interrupted(*a):
        if len(scored) == 2:
            raise KeyboardInterrupt("killed")  # not an Exception: as a kill, nothing catches it
        scored.append(a[-1])
        return real(*a)

    monkeypatch.setattr(mtp, "domain_accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mtp.main(argv("mtp"))
    assert scored == ["base / notes", "base / web"] and not (tmp_path / "mtp.json").exists()
    assert len(FinishedUnits(tmp_path / "mtp.units.json").entries) == 2
    monkeypatch.setattr(mtp, "domain_accuracy", lambda *a: scored.append(a[-1]) or real(*a))
    scored.clear()
    mtp.main(argv("mtp"))
    assert scored == ["cpt / notes", "cpt / web"]  # base was not scored again
    assert "base: 2 of 2 domains finished before, kept" in capsys.readouterr().out
    assert json.loads((tmp_path / "mtp.json").read_text()) == whole
    scored.clear()
    mtp.main(argv("mtp"))
    assert scored == []  # all finished
    (cpt / "config.json").write_bytes((cpt / "config.json").read_bytes())  # the checkpoint written again
    mtp.main(argv("mtp"))
    assert scored == ["cpt / notes", "cpt / web"]
