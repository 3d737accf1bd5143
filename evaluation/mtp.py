"""Next-next-token accuracy of a Qwen3.5 checkpoint's MTP (multi-token prediction) head on held-out text.

    python -m evaluation.mtp --model base=Qwen3.5-2B-Base --model cpt=release/ \\
        --data "Patient EHR"=out/mix/heldout/ehr.jsonl [--max-length 1024] [--max-docs 500] [--out results/mtp]

Serving engines use the MTP head to draft the token after next (speculative decoding); its top-1 accuracy
is roughly the share of drafts they accept. transformers loads Qwen3.5 without the head (it ignores the
``mtp.*`` tensors), so :class:`MTPHead` rebuilds it from transformers' own layer classes, wired as vLLM's
``Qwen3_5MTP`` runs it: at position i it takes the main model's final (normed) hidden state h_i and the
embedding of token i+1, and predicts token i+2 through the shared LM head::

    x = fc([pre_fc_norm_embedding(embed(t_{i+1})) ; pre_fc_norm_hidden(h_i)])
    x = layers(x)           # full-attention decoder layer(s), causal over the sequence
    logits = lm_head(norm(x))

Each document is scored from its start on its first ``--max-length`` tokens (teacher forcing: the true
token i+1 is fed). The table also gives the main model's next-token accuracy on the same positions'
text, for scale. Ids past the tokenizer's vocabulary are never predicted. Writes ``<out>.json``/``.md``.

Resumable as :mod:`evaluation.perplexity` is: each (model, domain) result is kept in ``<out>.units.json`` as it
finishes, keyed by the checkpoint's and data file's path, sizes and modification times, ``--max-length``,
``--max-docs`` and dtype. A rerun skips what is finished (a model with nothing left is not even loaded); a model that
fails is named, and what finished before it is kept.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from evaluation.common import (FinishedUnits, device_and_dtype, each_model_on_each_domain, load_hf_model, mask_padded_ids,
                               models_on_domains_parser, run_models_on_domains)
from evaluation.perplexity import read_documents
from preprocessing.cli import positive_int

PREFIX = "mtp."


class MTPHead(nn.Module):
    """The Qwen3.5 MTP head with the checkpoint's ``mtp.*`` parameter names (without the prefix)."""

    def __init__(self, text_config, num_layers: int = 1):
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

        super().__init__()
        h, eps = text_config.hidden_size, text_config.rms_norm_eps
        full = copy.deepcopy(text_config)
        full.layer_types = ["full_attention"] * num_layers  # MTP layers are gated full attention
        self.config = full
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(h, eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(h, eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(full, i) for i in range(num_layers))
        self.norm = Qwen3_5RMSNorm(h, eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, position_embeddings, position_ids) -> torch.Tensor:
        """Normed output for [b, s, h] final hidden states and the embeddings of the tokens one step ahead."""
        from transformers.masking_utils import create_causal_mask

        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        # positional: the cache argument is past_key_values up to transformers 5.20 (the gpu extra's), cache after
        mask = create_causal_mask(self.config, x, None, None)
        for layer in self.layers:
            x = layer(x, position_embeddings=position_embeddings, attention_mask=mask, position_ids=position_ids)
        return self.norm(x)


def mtp_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The ``mtp.*`` tensors of a HF checkpoint directory (prefix removed)."""
    from tools.hf_checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(model_dir)
    names = [k for k in ckpt.keys() if k.startswith(PREFIX)]
    if not names:
        raise ValueError(f"{model_dir}: no MTP head (no {PREFIX}* tensors)")
    return {k[len(PREFIX):]: ckpt.get(k) for k in names}


def load_mtp(model_dir: str | Path, text_config, dtype: torch.dtype, device: str) -> MTPHead:
    state = mtp_state(model_dir)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    head = MTPHead(text_config, num_layers=len(layers))
    head.load_state_dict(state, strict=True)
    return head.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def document_hits(model, head: MTPHead, ids: list[int], vocab: int, device: str) -> tuple[int, int, int]:
    """(next-token hits, MTP next-next-token hits, positions scored) of one document."""
    if len(ids) < 3:
        return 0, 0, 0
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    x = torch.tensor(ids, device=device).unsqueeze(0)
    hidden = lm(input_ids=x).last_hidden_state  # after the final norm, what the MTP head is fed
    positions = torch.arange(x.shape[1] - 1, device=device).unsqueeze(0)
    rope = lm.rotary_emb(hidden, positions.expand(3, 1, -1))  # text positions on the 3 mRoPE axes (5.17 wants them)
    out = head(hidden[:, :-1], lm.embed_tokens(x[:, 1:]), rope, positions)
    targets = x[0, 2:]  # position i predicts token i + 2 (MTP) and token i + 1 (main model)
    mtp = mask_padded_ids(model.lm_head(out[0, :-1]), vocab).argmax(-1)
    main = mask_padded_ids(model.lm_head(hidden[0, 1:-1]), vocab).argmax(-1)
    return int((main == targets).sum()), int((mtp == targets).sum()), targets.numel()


def domain_accuracy(model, head: MTPHead, tok, texts: list[str], max_length: int, device: str, desc: str) -> dict:
    """MTP and next-token accuracy over a domain's documents, each on its first ``max_length`` tokens."""
    main = mtp = n = 0
    for text in tqdm(texts, desc=desc, unit="doc"):
        ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids[:max_length]
        a, b, c = document_hits(model, head, ids, len(tok), device)
        main, mtp, n = main + a, mtp + b, n + c
    if not n:
        raise ValueError("no document has three tokens or more, nothing to score")
    return {"mtp_acc": mtp / n, "next_token_acc": main / n, "positions": n, "documents": len(texts)}


def evaluate(models: dict[str, str], data: dict[str, str], max_length: int = 1024, max_docs: int | None = None,
             device: str | None = None, units: FinishedUnits | None = None) -> dict:
    """The report; each (model, domain) result is taken from ``units`` when finished before, else computed and put
    there. Raises :class:`ModelFailed` naming the model (and the domain's file) when one fails."""
    device, dtype = device_and_dtype(device)
    docs = {domain: read_documents(path, max_docs) for domain, path in data.items()}

    def load(model_dir):
        model, tok = load_hf_model(model_dir, device, dtype)
        return model, load_mtp(model_dir, model.config.get_text_config(), dtype, device), tok

    results = each_model_on_each_domain(
        "mtp", models, data, (max_length, max_docs, str(dtype)), units or FinishedUnits(None), load,
        score=lambda loaded, name, domain: domain_accuracy(*loaded, docs[domain], max_length, device,
                                                           f"{name} / {domain}"))
    return {"models": models, "data": data, "max_length": max_length, "results": results}


def to_markdown(report: dict) -> str:
    names = list(report["models"])
    lines = ["| Domain | " + " | ".join(f"{n} MTP acc | {n} next-token acc" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for domain, row in report["results"].items():
        cells = [f"{100 * row[n]['mtp_acc']:.1f}% | {100 * row[n]['next_token_acc']:.1f}%" for n in names]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = models_on_domains_parser(__doc__, "with mtp.* tensors")
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens scored per document, from its start")
    p.add_argument("--out", default="results/mtp", help="writes OUT.json and OUT.md (OUT.units.json: finished results)")
    args = p.parse_args(argv)
    run_models_on_domains("mtp", args, lambda models, data, units: evaluate(
        models, data, args.max_length, args.max_docs, args.device, units), to_markdown)


if __name__ == "__main__":
    main()
