"""Compare logits of a HF Qwen3.5 directory and a megatron checkpoint on the same tokens.

    python -m tools.verify_conversion --hf-dir DIR --ckpt CKPT [--seq-len 256] [--tol 1e-3]

Run it after every conversion, either way round. Exits 1 when the max relative error exceeds --tol.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch


def compare(hf_dir: str | Path, ckpt: str | Path, seq_len: int = 256, batch: int = 2, seed: int = 0,
            device: str = "cpu", text: str | None = None) -> dict[str, float]:
    from evaluation.common import load_hf_model
    from megatron_ext.checkpoint import load_model

    hf, _ = load_hf_model(hf_dir, device)
    ours = load_model(ckpt, device=device, params_dtype=torch.float32)
    if text:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(hf_dir)(text, return_tensors="pt").input_ids
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, ours.qwen35_config.vocab_size, (batch, seq_len), generator=gen)
    ids = ids.to(device)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        out = ours(ids).float()
    diff = (out - ref).abs()
    return {
        "tokens": ids.numel(),
        "max_abs_err": diff.max().item(),
        "max_rel_err": (diff.max() / ref.abs().max()).item(),
        "mean_abs_err": diff.mean().item(),
        "argmax_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", help="compare on this text (tokenised with the HF dir's tokenizer) instead of random ids")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tol", type=float, default=1e-3, help="max relative error allowed (fp32 on both sides)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = compare(args.hf_dir, args.ckpt, args.seq_len, args.batch, args.seed, args.device, args.text)
    print("| metric | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.3e} |" if isinstance(v, float) else f"| {k} | {v} |")
    ok = result["max_rel_err"] <= args.tol
    print("OK" if ok else f"FAIL: max_rel_err {result['max_rel_err']:.3e} > tol {args.tol:g}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
