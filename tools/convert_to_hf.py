"""megatron-core checkpoint (any TP/PP it was saved with) -> HF Qwen3.5 directory for release.

    python -m tools.convert_to_hf --ckpt CKPT --out DIR [--hf-template DIR] [--dtype auto|bf16|fp32|fp16]
        [--max-shard-size 5GB] [--stop-tokens '<|im_end|>'] [--overwrite]

With ``--hf-template`` (e.g. the Qwen3.5-2B-Base directory you started from) the output is a complete
checkpoint of the template's architecture: the language model comes from CKPT, every other tensor (vision
tower, MTP, ...) and every non-weight file (config, tokenizer, chat template, processor) is copied from
the template unchanged. The MTP head is not trained here: the release's README says so (section "MTP head:
frozen"). Memory: one layer and one output tensor at a time (shards are written in place, not held). Without it: a text-only ``Qwen3_5ForCausalLM`` directory, with the tokenizer
files the checkpoint kept from its conversion. ``--dtype auto`` writes each tensor in the template's
dtype, else in the dtype its source had (recorded at conversion, so a bf16 release's fp32 ``A_log`` comes
back fp32), else in the checkpoint's; a tied source that stored ``lm_head.weight`` gets it back. An SFT run's
checkpoint also gives ``neurocpt_sft_chat.json`` (its data's ``chat_template_kwargs`` and template hash), with or
without a template: ``evaluation.eval_reasoning_judge`` prompts the export with them. The directory appears only
when complete.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import re
import shutil
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from preprocessing.atomic import DirectoryInUse, hold_output
from tools.hf_checkpoint import DTYPES, CheckpointError, count_by_part, size_argument

log = logging.getLogger(__name__)

MTP_PREFIX = "mtp."
DTYPE_NAMES = {v: k for k, v in {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.items()}
# fields that describe the architecture; the rest (eos id, context length) may legitimately differ
_IGNORED_FIELDS = {"eos_token_id", "max_position_embeddings", "padded_vocab_size"}


def _check_same_architecture(ours, template_config, where: Path) -> None:
    a, b = dataclasses.asdict(ours), dataclasses.asdict(template_config)
    diff = {k: (a[k], b[k]) for k in a if k not in _IGNORED_FIELDS and a[k] != b[k]}
    if diff:
        raise CheckpointError(f"{where}: template architecture differs from the checkpoint: "
                              + ", ".join(f"{k} checkpoint={x!r} template={y!r}" for k, (x, y) in diff.items()))


def _is_text_only(config_path: Path) -> bool:
    """Whether the checkpoint's source config (kept at conversion) is a text-only model's, so is the export's."""
    return config_path.is_file() and "text_config" not in json.loads(config_path.read_text())


def _text_only_config(config, dtype: torch.dtype) -> dict:
    from transformers import Qwen3_5TextConfig

    hf = Qwen3_5TextConfig(**config.to_hf_text_dict())
    out = hf.to_dict()
    out.update(architectures=["Qwen3_5ForCausalLM"], dtype=DTYPE_NAMES[dtype])
    return out


def convert(ckpt_dir: str | Path, out: str | Path, hf_template: str | Path | None = None, dtype: str = "auto",
            max_shard_size: str = "5GB", stop_tokens: list[str] = (), overwrite: bool = False) -> Path:
    from megatron_ext import build_model, hf_mapping, parallel
    from megatron_ext.checkpoint import HF_SOURCE_DIR, HF_TENSORS_FILE, hf_source_files, hf_source_tensors, read_config, resolve, saved_dtype
    from preprocessing.chat import SFT_CHAT_FILE
    from megatron_ext.config import Qwen35Config
    from tools.hf_checkpoint import HFCheckpoint, ShardedWriter, atomic_directory, check_output, parse_size

    check_output(out, [ckpt_dir, resolve(ckpt_dir), *([hf_template] if hf_template else [])], overwrite)
    config = read_config(ckpt_dir)
    template = HFCheckpoint(hf_template) if hf_template else None
    if template is not None:
        _check_same_architecture(config, Qwen35Config.from_hf(template.config), template.dir / "config.json")
        prefix = hf_mapping.lm_prefix(template.keys())
    else:
        prefix = "model."

    # the export carries the template's tokenizer, else the one kept at conversion: a stop token it lacks is refused
    # here, not after the export
    tokenizer_dir = Path(hf_template) if hf_template else resolve(ckpt_dir) / HF_SOURCE_DIR
    stop_ids = _stop_token_ids(tokenizer_dir, stop_tokens, hf_template or f"{ckpt_dir} (kept from its conversion)")
    parallel.initialize()
    # the model lends its layout (names, shapes, TP resharding); its own weights are never filled
    model = build_model(config, backend="local", device="cpu", params_dtype=saved_dtype(ckpt_dir),
                        perform_initialization=False)
    reader = _LayerReader(model, ckpt_dir)
    recorded, left_out = hf_source_tensors(ckpt_dir)  # the source's tensors and dtypes, when converted from HF here
    if template is None and left_out:
        log.warning("the checkpoint's source has %d tensors outside the language model (%s) that this export, with no "
                    "--hf-template, does not hold (an MTP head its config may still declare); pass --hf-template <the "
                    "source's HF directory> to carry them", len(left_out), count_by_part(left_out))
    stored_head = config.tie_word_embeddings and hf_mapping.LM_HEAD in (template.files if template else recorded)

    def out_dtype(name: str, saved: torch.dtype) -> torch.dtype:
        if dtype != "auto":
            return DTYPES[dtype]
        if template is not None and name in template.files:
            return template.dtype_of(name)
        return recorded.get(hf_mapping.relative_name(name, prefix), saved)

    meta = hf_mapping.megatron_to_hf(config, reader.meta, prefix, stored_head)
    plan = [(name, out_dtype(name, t.dtype), tuple(t.shape)) for name, t in meta]
    dtypes = {name: d for name, d, _ in plan}
    others = [k for k in template.keys() if not hf_mapping.is_language_model(k, prefix)] if template is not None else []
    plan += [(name, template.dtype_of(name), template.shape_of(name)) for name in others]

    with atomic_directory(out) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        for name, tensor in tqdm(hf_mapping.megatron_to_hf(config, reader.get, prefix, stored_head),
                                 desc="megatron -> HF", unit="tensor"):
            writer.write(name, tensor.to(dtypes[name]))
        for name in tqdm(others, desc="template tensors", unit="tensor"):
            writer.write(name, template.get(name))
        writer.close()
        if template is not None:
            for f in template.extra_files():
                if f.name != SFT_CHAT_FILE:  # the template's own SFT record, if it is an export: not this model's
                    shutil.copy2(f, tmp / f.name)
            sft_chat = resolve(ckpt_dir) / HF_SOURCE_DIR / SFT_CHAT_FILE
            if sft_chat.is_file():  # an SFT run's: how its conversations were rendered, for evaluation's prompts
                shutil.copy2(sft_chat, tmp / SFT_CHAT_FILE)
            _match_config(tmp / "config.json", dtypes[prefix + "embed_tokens.weight"], config.tie_word_embeddings)
            if any(k.startswith(MTP_PREFIX) for k in others):
                _declare_frozen_mtp(tmp / "README.md", Path(hf_template))
        else:
            for f in hf_source_files(ckpt_dir):
                if f.name != HF_TENSORS_FILE:
                    shutil.copy2(f, tmp / f.name)
            if _is_text_only(tmp / "config.json"):  # the source's own config, every field as it was
                _match_config(tmp / "config.json", dtypes[prefix + "embed_tokens.weight"], config.tie_word_embeddings)
            else:
                text = _text_only_config(config, dtypes[prefix + "embed_tokens.weight"])
                (tmp / "config.json").write_text(json.dumps(text, indent=2) + "\n")
            if not (tmp / "generation_config.json").exists():
                gen = {"eos_token_id": config.eos_token_id} if config.eos_token_id is not None else {}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if stop_ids:
            _add_stop_ids(tmp / "generation_config.json", stop_ids)
    return Path(out)


class _LayerReader:
    """The megatron tensors of a dist checkpoint, one layer at a time: ``get(name)`` loads the layer (or
    lone tensor) that ``name`` belongs to into fresh memory and drops the previous one, so the export holds
    one layer, not a model. The model's sharded state dict says what to load and how TP shards merge."""

    def __init__(self, model, ckpt_dir: str | Path):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron_ext.checkpoint import resolve, saved_dtype_of

        self.dir = str(resolve(ckpt_dir))
        self.state = {k: v for k, v in model.sharded_state_dict().items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
        saved = {k: v.dtype for k, v in dist_checkpointing.load_tensors_metadata(self.dir).items()}
        # a converted checkpoint keeps a few tensors wider than the model's dtype: read at that width
        self.dtypes = {k: saved_dtype_of(v, saved) or v.data.dtype for k, v in self.state.items()}
        self.group, self.loaded = None, {}

    def meta(self, name: str) -> torch.Tensor:
        """A data-less stand-in for tensor ``name``: its shape and saved dtype."""
        return torch.empty(self.state[name].data.shape, dtype=self.dtypes[name], device="meta")

    @staticmethod
    def _group(name: str) -> str:
        m = re.match(r"decoder\.layers\.\d+\.", name)
        return m.group(0) if m else name

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; a shard that cannot be read raises :class:`CheckpointError` naming the checkpoint and
        the layer (torch's own error names neither, and is a BaseException that no ``except Exception`` sees)."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import CheckpointException

        group = self._group(name)
        if group != self.group:
            self.loaded = {}  # freed before the next layer arrives
            request = {}
            for k, v in self.state.items():
                if self._group(k) == group:
                    request[k] = copy.copy(v)
                    # fresh memory at the saved width, not the model's weights
                    request[k].data = torch.empty(v.data.shape, dtype=self.dtypes[k])
            try:
                self.loaded, self.group = dist_checkpointing.load(request, self.dir), group
            except CheckpointException as err:
                causes = "; ".join(traceback.format_exception_only(e)[-1].strip() for e, _ in err.failures.values())
                raise CheckpointError(f"{self.dir}: cannot read {group.rstrip('.')}: a shard is truncated or missing "
                                      f"({causes})") from err
        return self.loaded[name]


def _declare_frozen_mtp(readme: Path, template: Path) -> None:
    """Say in the release that its MTP head is the template's, untrained (see the project README)."""
    note = (f"\n\n## MTP head: frozen\n\nThe language model was trained with neurocpt (continued pre-training, SFT); the "
            f"MTP (multi-token prediction) head, the `{MTP_PREFIX}*` tensors, is frozen: copied unchanged from "
            f"`{template.name}`, it was trained for that model's trunk, not this one. Speculative decoding with it "
            "stays exact but may accept fewer draft tokens; its next-next-token accuracy on held-out text is "
            "measured by `python -m evaluation.mtp` (in the evaluation report).\n")
    readme.write_text((readme.read_text() if readme.is_file() else "") + note)


def _stop_token_ids(directory: Path, tokens: list[str], source: str | Path) -> list[int]:
    """The ids of ``tokens`` in the tokenizer in ``directory``; ValueError naming ``source`` for one it lacks."""
    if not tokens:
        return []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    ids = []
    for t in tokens:
        i = tok.convert_tokens_to_ids(t)
        if i is None or i == tok.unk_token_id and t != tok.unk_token:
            raise ValueError(f"--stop-tokens: {t!r} is not a token of the tokenizer of {source}")
        ids.append(i)
    return ids


def _add_stop_ids(path: Path, ids: list[int]) -> None:
    """Make generation stop at ``ids`` too (an SFT model ends its turns with the chat template's
    end-of-turn token, e.g. ``<|im_end|>``, which a base model's generation_config does not list)."""
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    gen["eos_token_id"] = ids + [i for i in eos if i not in ids]
    path.write_text(json.dumps(gen, indent=2))


def _match_config(config_path: Path, dtype: torch.dtype, tied: bool) -> None:
    """Make the config say what the export holds: ``dtype`` wherever it names one (``dtype``, older files
    ``torch_dtype``; at the top and in ``text_config``), and in ``text_config`` whether the output layer is the
    embedding. A multimodal config ties by its top-level flag for transformers' multimodal class, but vLLM's
    Qwen3.5 and ``AutoModelForCausalLM`` read ``text_config``'s, which transformers defaults to untied: there a
    tied export (no ``lm_head.weight``) fails to load in vLLM, or gets a random head. A config that already says
    both stays byte for byte the template's."""
    config = json.loads(config_path.read_text())
    changed = False
    for part in (config, config.get("text_config") or {}):
        keys = [k for k in ("dtype", "torch_dtype") if k in part] or (["dtype"] if part is config else [])
        for key in keys:
            changed |= part.get(key) != DTYPE_NAMES[dtype]
            part[key] = DTYPE_NAMES[dtype]
    if "text_config" in config and config["text_config"].get("tie_word_embeddings") != tied:
        config["text_config"]["tie_word_embeddings"] = tied
        changed = True
    if changed:
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="megatron checkpoint directory, or a run's checkpoints/ directory "
                                                 "(its 'latest' file names the checkpoint)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--hf-template", help="HF checkpoint whose other tensors, config and tokenizer to carry over")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: each tensor in the template's dtype (without a template: its source's, as recorded "
                        "at conversion, else the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", type=size_argument, help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--stop-tokens", default="", help="comma-separated tokens generation also stops at (SFT: '<|im_end|>')")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never CKPT or the template)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stops = [t for t in args.stop_tokens.split(",") if t]
    try:
        with hold_output(args.out, "conversion"):  # two at once would publish one's half-written files as the other's
            out = convert(args.ckpt, args.out, args.hf_template, args.dtype, args.max_shard_size, stops, args.overwrite)
    except (CheckpointError, OSError, ValueError, DirectoryInUse) as err:  # bad input, named; no output was written
        raise SystemExit(f"convert_to_hf: {err}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
