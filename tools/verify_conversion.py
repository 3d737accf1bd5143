"""Compare logits of a HF Qwen3.5 directory and a megatron checkpoint on the same tokens.

    python -m tools.verify_conversion --hf-dir DIR --ckpt CKPT [--seq-len 256] [--precision auto|float64|float32]
        [--tol TOL]

Run it after every conversion, either way round. Both models run in float64 when the checkpoint has at
most 3e9 parameters (``--precision auto``; every release this project converts, 2B included), so the two
implementations agree to ~1e-12 and a mapping error (~1e-3 or more) cannot hide in float32 rounding (~1e-4
on a 2B model's logits). Exits 1 when the largest error relative to the largest logit exceeds ``--tol``
(default 1e-9 in float64, 1e-3 in float32). Also prints the largest error per span of positions: an error
that grows with position points at the recurrent (GDN) state or RoPE, one at position 0 at the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from pathlib import Path

import torch

# both models in float64 take 16 bytes per parameter: 3e9 parameters are 48 GB, what a CPU node has to
# spare beside the activations; Qwen3.5-2B (~2.3e9 with its vision tower) needs ~37 GB. Larger: float32.
FLOAT64_MAX_PARAMS = 3 * 10**9
TOLERANCE = {"float64": 1e-9, "float32": 1e-3}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def checkpoint_parameters(hf_dir: str | Path) -> int:
    from tools.hf_checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(hf_dir)
    return sum(math.prod(ckpt.shape_of(name)) for name in ckpt.keys())


def compare(hf_dir: str | Path, ckpt: str | Path, seq_len: int = 256, batch: int = 2, seed: int = 0,
            device: str = "cpu", text: str | None = None, precision: str = "auto") -> dict:
    """Error metrics of our logits against transformers'; ``max_abs_err_by_position`` lists, for each
    position, the largest error over the batch and the vocabulary."""
    from evaluation.common import load_hf_model
    from megatron_ext.checkpoint import load_model
    from tools.float64 import float64

    if precision == "auto":
        precision = "float64" if checkpoint_parameters(hf_dir) <= FLOAT64_MAX_PARAMS else "float32"
    dtype = DTYPES[precision]
    hf, _ = load_hf_model(hf_dir, device, dtype)
    ours = load_model(ckpt, device=device, params_dtype=dtype)
    with float64() if dtype == torch.float64 else contextlib.nullcontext():
        if text:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(hf_dir)(text, return_tensors="pt").input_ids
        else:
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, ours.qwen35_config.vocab_size, (batch, seq_len), generator=gen)
        ids = ids.to(device)
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.to(dtype)
            out = ours(ids).to(dtype)
    diff = (out - ref).abs()
    return {
        "precision": precision,
        "tokens": ids.numel(),
        "max_abs_err": diff.max().item(),
        "max_rel_err": (diff.max() / ref.abs().max()).item(),
        "mean_abs_err": diff.mean().item(),
        "argmax_agreement": (out.argmax(-1) == ref.argmax(-1)).double().mean().item(),
        "max_abs_err_by_position": diff.amax(dim=(0, 2)).tolist(),
    }


def position_table(errors: list[float], rows: int = 16) -> str:
    """The largest error in each of up to ``rows`` consecutive spans of positions, as a markdown table."""
    step = max(1, math.ceil(len(errors) / rows))
    lines = ["| positions | max_abs_err |", "|---|---|"]
    for start in range(0, len(errors), step):
        span = errors[start : start + step]
        lines.append(f"| {start}-{start + len(span) - 1} | {max(span):.3e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", help="compare on this text (tokenised with the HF dir's tokenizer) instead of random ids")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", *DTYPES],
                   help=f"both models' dtype; auto: float64 up to {FLOAT64_MAX_PARAMS:.0e} parameters, else float32")
    p.add_argument("--tol", type=float, help="max error relative to the largest logit (default: 1e-9 in float64, 1e-3 in float32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from tools.hf_checkpoint import CheckpointError

    try:
        result = compare(args.hf_dir, args.ckpt, args.seq_len, args.batch, args.seed, args.device, args.text, args.precision)
    except (CheckpointError, OSError) as err:  # a missing or swapped --hf-dir / --ckpt: named, as the converters do
        raise SystemExit(f"verify_conversion: {err}") from None
    by_position = result.pop("max_abs_err_by_position")
    print("| metric | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.3e} |" if isinstance(v, float) else f"| {k} | {v} |")
    print("\n" + position_table(by_position) + "\n")
    tol = TOLERANCE[result["precision"]] if args.tol is None else args.tol
    ok = result["max_rel_err"] <= tol
    print("OK" if ok else f"FAIL: max_rel_err {result['max_rel_err']:.3e} > tol {tol:g}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
