"""The MTP head's next-next-token accuracy (evaluation.mtp): the forward is wired as serving engines run it
(embedding of token i+1 first, then the hidden state i, predicting token i+2), and the report shows it."""

from __future__ import annotations

import json

import pytest
import torch

from evaluation import mtp, report
from tools.tiny_qwen35 import add_mtp, causal_lm, multimodal, text_config, write_tokenizer


def _copy_head(model) -> mtp.MTPHead:
    """An MTP head that predicts its input token again: fc keeps the (normed) embedding half, the layer adds
    nothing (zero output projections), the norms are plain (zero-centred weights)."""
    config = model.config
    head = mtp.MTPHead(config).double().eval()
    h = config.hidden_size
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.fc.weight[:, :h] = torch.eye(h, dtype=torch.float64)
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
    assert 0 <= main_hits <= n


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
    texts = ["The patient presented with acute ischemic stroke.", "Neurons in the hippocampus encode place and time."]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = mtp.evaluate({"base": str(release), "cpt": str(release)}, {"EHR": str(data)}, max_length=8, device="cpu")
    from transformers import AutoTokenizer

    lengths = [min(len(AutoTokenizer.from_pretrained(release)(t).input_ids), 8) for t in texts]
    row = result["results"]["EHR"]
    assert row["base"]["positions"] == sum(n - 2 for n in lengths)
    assert row["base"] == row["cpt"] and 0 <= row["base"]["mtp_acc"] <= 1
    (tmp_path / "mtp.json").write_text(json.dumps(result))
    text = report.build(tmp_path, tmp_path / "report.md")
    assert "## MTP head: next-next-token accuracy" in text and "| EHR |" in text


def test_a_checkpoint_without_mtp_head_is_named(tmp_path):
    causal_lm(text_config(), seed=1).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="no MTP head"):
        mtp.mtp_state(tmp_path / "hf")


def test_a_domain_without_a_scorable_position_is_named(release, tmp_path):
    (tmp_path / "short.jsonl").write_text('{"text": ""}\n{"text": "a"}\n')  # no token has two before it
    with pytest.raises(ValueError, match=r"short\.jsonl: no document of 'tiny' has three tokens"):
        mtp.evaluate({"base": str(release)}, {"tiny": str(tmp_path / "short.jsonl")}, device="cpu")
