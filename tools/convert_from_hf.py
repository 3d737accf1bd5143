"""HF Qwen3.5 checkpoint -> megatron-core distributed checkpoint that the trainer and ``load_model`` read.

    python -m tools.convert_from_hf --hf-dir DIR --out CKPT [--tp N] [--pp N] [--dtype auto|bf16|fp32|fp16]
        [--vocab-divisor 128] [--overwrite]

The dist checkpoint is layout-free (megatron reshards at load), so it loads under any TP/PP; ``--tp`` and
``--pp`` check that the architecture divides for the layout you will train with. As megatron does, the
embedding (and untied output layer) is padded with zero rows to a multiple of ``--vocab-divisor`` x TP;
the model never predicts those ids and ``convert_to_hf`` drops them. Tied embeddings (the small releases'
``tie_word_embeddings: true``) stay tied (a tied checkpoint that stores ``lm_head.weight`` anyway gets it back
at export). ``--dtype auto`` builds the model in the dtype most of the source's parameters have (a bf16
release: bf16) and keeps the tensors the source stores wider in their own dtype (Qwen3.5 releases store the
GDN ``A_log`` and ``linear_attn.norm.weight`` in fp32), so the checkpoint holds every tensor exactly; each
tensor's source dtype is recorded for the export. Only the language model is converted; vision tower and MTP
weights stay in the HF directory and come back at export (``tools.convert_to_hf --hf-template``).
Memory: one model copy plus one HF tensor at a time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import math
from pathlib import Path

import torch

from preprocessing.atomic import DirectoryInUse, hold_output
from preprocessing.cli import positive_int
from tools.hf_checkpoint import DTYPES, CheckpointError, count_by_part

log = logging.getLogger(__name__)


def dominant_dtype(ckpt, dtypes: dict[str, torch.dtype]) -> torch.dtype:
    """The dtype that most of the language model's parameters have: the one it trains in."""
    sizes = collections.Counter()
    for name, dtype in dtypes.items():
        sizes[dtype] += math.prod(ckpt.shape_of(name))
    return sizes.most_common(1)[0][0]


def _keep_wider(model, config, dtypes: dict[str, torch.dtype], prefix: str) -> None:
    """Widen each parameter whose source tensors are wider than the model's dtype (fp32 ``A_log`` in a bf16
    release) to their dtype, so the checkpoint holds it exactly instead of rounded."""
    from megatron_ext import hf_mapping
    from megatron_ext.model import widen_parameters

    widen_parameters(model, {rule.megatron: functools.reduce(
        torch.promote_types, (dtypes[hf_mapping.hf_name(k, prefix)] for k in rule.hf)) for rule in hf_mapping.rules(config)})


def convert(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: str = "auto",
            vocab_divisor: int = 128, overwrite: bool = False) -> Path:
    from megatron_ext import build_model, hf_mapping, parallel
    from megatron_ext.checkpoint import save_model
    from megatron_ext.config import Qwen35Config
    from tools.hf_checkpoint import HFCheckpoint, check_output

    check_output(out, [hf_dir], overwrite)
    ckpt = HFCheckpoint(hf_dir)
    try:
        config = Qwen35Config.from_hf(ckpt.config).padded_to(vocab_divisor * tp)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt.dir / 'config.json'}: {err}") from err
    if config.num_hidden_layers % pp:
        raise CheckpointError(f"{config.num_hidden_layers} layers do not split into {pp} pipeline stages")
    try:  # validates divisibility; megatron asks pipelines for the dtype of what they send between stages
        config.to_transformer_config(tensor_parallel=tp, pipeline_parallel=pp, pipeline_dtype=torch.float32)
    except ValueError as err:
        raise CheckpointError(f"--tp {tp} --pp {pp}: {err}") from err

    prefix = hf_mapping.lm_prefix(ckpt.keys())
    needed = {hf_mapping.hf_name(k, prefix) for rule in hf_mapping.rules(config) for k in rule.hf}
    language_model = {k for k in ckpt.keys() if hf_mapping.is_language_model(k, prefix)}
    for name in sorted(language_model - needed):
        if name == hf_mapping.LM_HEAD and config.tie_word_embeddings:
            if not torch.equal(ckpt.get(name), ckpt.get(prefix + "embed_tokens.weight")):
                raise CheckpointError(f"tensor {name!r} in {ckpt.file_of(name)} differs from the embedding, "
                                      "but the config ties them")
            continue
        raise CheckpointError(f"unexpected tensor {name!r} in {ckpt.file_of(name)}: not part of this Qwen3.5 config")
    missing = sorted(needed - set(ckpt.keys()))
    if missing:
        shards = ", ".join(sorted({f.name for f in ckpt.files.values()}))
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {ckpt.dir} (none of {shards} has it; "
                              f"{len(missing)} missing in all)")

    dtypes = {name: ckpt.dtype_of(name) for name in sorted(language_model)}
    params_dtype = dominant_dtype(ckpt, dtypes) if dtype == "auto" else DTYPES[dtype]
    parallel.initialize()
    model = build_model(config, backend="local", device="cpu", params_dtype=params_dtype, perform_initialization=False)
    if dtype == "auto":
        _keep_wider(model, config, dtypes, prefix)
    try:
        hf_mapping.copy_hf_into(
            model, config, ckpt.get, prefix, describe=lambda n: f"{n!r} in {ckpt.file_of(n)}", progress=True
        )
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    weights = _SavedWeights(model)
    del model  # the sharded state dict now holds the only references to the weights
    recorded = {hf_mapping.relative_name(name, prefix): d for name, d in dtypes.items()}
    left_out = sorted(set(ckpt.keys()) - language_model)
    if left_out:
        log.info("%d tensors outside the language model are not trained (%s); convert_to_hf carries them into a release "
                 "from --hf-template", len(left_out), count_by_part(left_out))
    return save_model(weights.compacted(), out, hf_files=ckpt.extra_files(), hf_tensors=recorded, hf_left_out=left_out)


class _SavedWeights:
    """The model as ``save_model`` uses it (sharded state dict and config), for a peak of one model copy.

    megatron's save splits fused weights (GLU ``linear_fc1``, GDN ``in_proj``, attention ``linear_qkv``) into
    slices for TP resharding and clones every slice before writing anything: half a model more at the
    peak. Here each slice gets its own storage one at a time and the fused weight is freed once its slices
    are copied, so megatron finds nothing to clone."""

    def __init__(self, model):
        from megatron.core.dist_checkpointing.mapping import apply_factories

        self.qwen35_config = model.qwen35_config
        self._state = model.sharded_state_dict()
        apply_factories(self._state)

    def compacted(self) -> "_SavedWeights":
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        for sh in nested_values(self._state):
            if isinstance(sh, ShardedTensor) and sh.data.untyped_storage().nbytes() != sh.data.nbytes:
                sh.data = sh.data.clone()
        return self

    def sharded_state_dict(self) -> dict:
        return self._state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF Qwen3.5 checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="megatron checkpoint directory to write")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size you will train with (checked)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size you will train with (checked)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the dtype most of the source's parameters have; tensors it stores wider stay wider")
    p.add_argument("--vocab-divisor", type=positive_int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (megatron's make-vocab-size-divisible-by)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never the HF directory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        with hold_output(args.out, "conversion"):  # two at once would publish one's half-written files as the other's
            out = convert(args.hf_dir, args.out, args.tp, args.pp, args.dtype, args.vocab_divisor, args.overwrite)
    except (CheckpointError, OSError, DirectoryInUse) as err:  # bad input, named; no output was written
        raise SystemExit(f"convert_from_hf: {err}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
