"""GPU checks of the model spec (needs CUDA; TE for the TE rows). Prints a markdown report.

    python -m tools.check_gpu_model [--hf-config Qwen3.5-2B-Base/config.json] [--seq 4096]

1. flash-linear-attention kernels vs the pure-torch ones, bf16 inputs, packed documents.
2. TE spec vs local spec on the Qwen3.5-2B shape: same weights, bf16 logits compared.
3. One forward+backward at ``--seq`` tokens (packed row), timed, with peak memory.

Without ``--hf-config`` it uses ``APPROX_2B`` below (an approximation of the 2B shape: pass the real
config.json for recorded numbers).
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch

APPROX_2B = dict(
    vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16, tie_word_embeddings=True,
)


def kernel_check(device: str) -> list[tuple[str, float]]:
    from megatron_ext.kernels import causal_conv1d_silu, gated_delta_rule

    torch.manual_seed(0)
    t, hk, hv, d = 3000, 4, 8, 128
    cu = torch.tensor([0, 700, 2100, 3000], device=device, dtype=torch.int32)
    q, k = (torch.randn(1, t, hk, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, t, hv, d, device=device, dtype=torch.bfloat16)
    g = -torch.rand(1, t, hv, device=device) * 0.5
    beta = torch.rand(1, t, hv, device=device, dtype=torch.bfloat16)
    fla = gated_delta_rule(q, k, v, g, beta, cu, "fla").float()
    ref = gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), cu, "torch")
    x = torch.randn(1, t, 512, device=device, dtype=torch.bfloat16)
    w = torch.randn(512, 4, device=device, dtype=torch.bfloat16)
    conv_fla = causal_conv1d_silu(x, w, cu, "fla").float()
    conv_ref = causal_conv1d_silu(x.float(), w.float(), cu, "torch")
    return [
        ("gated delta rule, fla bf16 vs torch fp32: max abs err", (fla - ref).abs().max().item()),
        ("causal conv1d, fla bf16 vs torch fp32: max abs err", (conv_fla - conv_ref).abs().max().item()),
    ]


def spec_check(config, seq: int) -> list[tuple[str, float]]:
    from megatron_ext import build_model
    from megatron_ext.spec import have_transformer_engine

    rows = []
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
    pos = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)]).unsqueeze(0).cuda()  # 2 documents
    local = build_model(config, "local", params_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = local(ids, pos).float()
    if have_transformer_engine():
        te = build_model(config, "te", params_dtype=torch.bfloat16)
        te.load_state_dict(local.state_dict(), strict=False)  # same names by design; TE adds _extra_state
        with torch.no_grad():
            out = te(ids, pos).float()
        rows.append(("TE vs local spec, bf16 logits: max rel err", ((out - ref).abs().max() / ref.abs().max()).item()))
        model = te
    else:
        rows.append(("TE vs local spec", float("nan")))
        model = local
    model.train()
    labels = torch.roll(ids, -1, 1)
    for _ in range(2):  # warm-up, then timed
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model(ids, pos, labels=labels).mean().backward()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    rows.append((f"fwd+bwd at seq {seq} ({model.backend} spec, bf16): seconds", elapsed))
    rows.append(("... tokens/s", seq / elapsed))
    rows.append(("... peak memory GiB", torch.cuda.max_memory_allocated() / 2**30))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", help="the real Qwen3.5-2B(-Base) config.json or its directory")
    p.add_argument("--seq", type=int, default=4096)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from megatron_ext import Qwen35Config, parallel

    parallel.initialize()
    config = Qwen35Config.from_hf(args.hf_config) if args.hf_config else Qwen35Config(**APPROX_2B)
    rows = kernel_check("cuda") + spec_check(config, args.seq)
    print(f"\n### Model spec GPU checks ({date.today()}, {torch.cuda.get_device_name()}, "
          f"shape: {'from ' + args.hf_config if args.hf_config else 'APPROX_2B'})\n")
    print("| check | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4g} |")


if __name__ == "__main__":
    main()
