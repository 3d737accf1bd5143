"""Chat conversations -> megatron indexed datasets of token ids and loss masks for SFT.

    python -m preprocessing.build_sft --config sft_recipe.yaml [--workers N] [--clean] [--keep-work]

Input: jsonl files (or .jsonl.gz, .bz2, .xz, .zst) of ``{"id": ..., "messages": [{"role": ..., "content": ...}, ...], "tools": [...]}``
(``tools`` optional: the function definitions the template declares), or of ShareGPT or Alpaca records, read as the
messages they hold (:func:`preprocessing.chat.as_messages`);
assistant turns may carry reasoning as ``<think>...</think>`` before the answer. Every conversation is
rendered with the tokenizer's own chat template (:mod:`preprocessing.chat`), tokenised once with character
offsets, and gets a loss mask: 1 on assistant tokens (``loss_on: assistant``) or on every token (``all``).

Bad records are quarantined with file, line and reason, and counted: malformed JSON, no ``messages``,
unknown roles, no assistant turn, a template error, samples longer than ``seq_length + 1`` tokens (the
trainer packs whole conversations and never cuts one).

Outputs in ``output_dir``: ``{train,valid}_tokens.{bin,idx}`` and ``{train,valid}_loss_mask.{bin,idx}`` (the
same documents, mask as uint8), ``sft.json`` (what the trainer reads: ``sft_data: .../sft.json``),
``report.md`` + ``lengths.png``, ``errors/``. One datatrove stage with completion markers under
``logs/``: rerun the same command after a crash and only unfinished tasks run. Its per-worker outputs
(``work/``) are removed after the merge; a rerun of a finished build returns at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from preprocessing.chat import LOSS_ON, ROLES, check_conversation, encode_sample, record_tools, render_samples, template_sha
from preprocessing.cli import positive_int

log = logging.getLogger(__name__)
NAME = "sft"  # the ledger's one "source"
SPLITS = ("train", "valid")


@dataclass
class SFTRecipe:
    tokenizer: str  # a local HF tokenizer directory with a chat template (the model's own)
    output_dir: str
    paths: list[str]  # globs of jsonl files (compressed too: .gz .bz2 .xz .zst), relative to the recipe file
    seq_length: int = 4096
    loss_on: str = "assistant"  # or "all"
    chat_template_kwargs: dict = field(default_factory=dict)  # passed to the template, e.g. {enable_thinking: true}
    roles: list[str] = field(default_factory=lambda: list(ROLES))
    valid_fraction: float = 0.02
    seed: int = 1234
    base_dir: str = "."

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError("valid_fraction must be in [0, 1)")

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "SFTRecipe":
        path = Path(path)
        raw = {**(yaml.safe_load(path.read_text()) or {}), **overrides}
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown SFT recipe keys {sorted(unknown)}")
        raw["base_dir"] = str(path.parent / raw.get("base_dir", "."))
        return cls(**raw)

    def resolve(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else (Path(self.base_dir) / q).resolve()

    def files(self) -> list[str]:
        import glob

        found = sorted({p for pattern in self.paths for p in glob.glob(str(self.resolve(pattern)), recursive=True)})
        if not found:
            raise FileNotFoundError(f"no SFT files match {self.paths} (relative to {self.base_dir})")
        return found

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)


class ChatReader(PipelineStep):
    """Conversations from jsonl files (sharded over ranks); bad records go to ``errors/`` and are counted."""

    name = "💬 Chat reader"
    type = "📖 - READER"

    def __init__(self, files: list[str], errors_dir: str, roles: list[str]):
        super().__init__()
        self.files, self.errors_dir, self.roles = files, errors_dir, tuple(roles)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from preprocessing.steps import Quarantine, jsonl_records

        quarantine = Quarantine(self.errors_dir, "read", rank)
        try:
            for path in self.files[rank::world_size]:
                try:
                    for line, record, problem in jsonl_records(path):
                        messages, reason = (None, problem) if problem else check_conversation(record, self.roles)
                        self.stat_update(f"read/{NAME}")
                        if reason:
                            self.stat_update(f"quarantined/{NAME}/{reason}")
                            quarantine.write(path, line, reason, record if isinstance(record, str) else json.dumps(record))
                            continue
                        doc_id = str(record.get("id") or f"{Path(path).name}:{line}")
                        yield Document(text="", id=doc_id, metadata={"messages": messages, "file": path, "line": line,
                                                                     "template_kwargs": record_tools(record)})
                except Exception as err:  # unreadable or corrupt (a cut gzip: EOFError); the others go on
                    self.stat_update(f"read/{NAME}", f"quarantined/{NAME}/unreadable_file")
                    quarantine.write(path, None, "unreadable_file", f"{type(err).__name__}: {err}")
        finally:
            quarantine.close()


class ChatTokenWriter(PipelineStep):
    """Renders, tokenises and masks each conversation, splits train/valid by id, and writes per-rank
    indexed datasets of tokens and masks with megatron-core's ``IndexedDatasetBuilder``."""

    name = "🧮 SFT tokens"
    type = "✍ - WRITER"

    def __init__(self, output_dir: str, errors_dir: str, tokenizer_dir: str, recipe: SFTRecipe):
        super().__init__()
        self.output_dir, self.errors_dir, self.tokenizer_dir = output_dir, errors_dir, tokenizer_dir
        self.seq_length, self.loss_on, self.template_kwargs = recipe.seq_length, recipe.loss_on, recipe.chat_template_kwargs
        self.valid_fraction, self.seed = recipe.valid_fraction, recipe.seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        from preprocessing.steps import Quarantine, is_heldout
        from preprocessing.tokenizer import hf_tokenizer, token_dtype

        hf = hf_tokenizer(self.tokenizer_dir)
        if not hf.chat_template:
            raise ValueError(f"{self.tokenizer_dir}: the tokenizer has no chat template; SFT renders with the model's own")
        backend, dtype = hf.backend_tokenizer, token_dtype(len(hf))
        quarantine = Quarantine(self.errors_dir, "tokenize", rank)
        builders = {}
        for split in SPLITS:
            for kind, kind_dtype in (("tokens", dtype), ("loss_mask", np.uint8)):
                path = Path(self.output_dir) / f"{split}_{kind}" / f"{rank:05d}.bin"
                path.parent.mkdir(parents=True, exist_ok=True)
                builders[split, kind] = IndexedDatasetBuilder(str(path), dtype=kind_dtype)
        try:
            for doc in data:
                samples = self._encode(backend, hf, doc, quarantine)
                if samples is None:
                    continue
                split = "valid" if is_heldout(_opening(doc.metadata["messages"]), self.valid_fraction, self.seed) \
                    else "train"
                self.stat_update(f"{'heldout' if split == 'valid' else 'kept'}/{NAME}")
                for ids, mask in samples:
                    builders[split, "tokens"].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    builders[split, "loss_mask"].add_document(np.asarray(mask, dtype=np.uint8), [len(mask)])
                    self.stat_update(f"samples/{split}")
                    self.stat_update(f"tokens/{split}", value=len(ids))
                    self.stat_update(f"loss_tokens/{split}", value=sum(mask))
                yield doc
        finally:
            quarantine.close()
        for (split, kind), builder in builders.items():
            builder.finalize(str(Path(self.output_dir) / f"{split}_{kind}" / f"{rank:05d}.idx"))

    def _encode(self, backend, hf, doc: Document, quarantine) -> list[tuple[list[int], list[int]]] | None:
        def bad(reason: str, detail: str = "") -> None:
            self.stat_update(f"quarantined/{NAME}/{reason}")
            quarantine.write(doc.metadata["file"], doc.metadata["line"], reason, detail)

        kwargs = {**self.template_kwargs, **doc.metadata.get("template_kwargs", {})}  # the record's tools
        try:
            rendered, split_turns = render_samples(hf, doc.metadata["messages"], self.loss_on, kwargs)
            samples = [encode_sample(backend, text, spans) for text, spans in rendered]
            if None in samples:  # an earlier turn's context encodes otherwise within the whole: a sample per turn
                rendered, split_turns = render_samples(hf, doc.metadata["messages"], self.loss_on, kwargs, per_turn=True)
                samples = [encode_sample(backend, text, spans) for text, spans in rendered]
        except Exception as err:  # jinja errors (the template's raise_exception) and prefix violations
            return bad("template_error", f"{type(err).__name__}: {err}")
        for ids, _ in samples:
            if len(ids) > self.seq_length + 1:
                return bad("too_long", f"{len(ids)} tokens > seq_length + 1 = {self.seq_length + 1}")
        if split_turns:
            self.stat_update("split_into_turns")
        return samples


def _opening(messages: list[dict]) -> str:
    """What the held-out split draws by: the messages up to the first user turn, not the record's id. Every sample of
    a conversation shows them, so copies of a conversation (SFT sets repeat them) and conversations that share an
    opening (a one-turn one and the first turn of a longer one render the same sample) land on one side, and
    val/sft never scores a sample that is trained on."""
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return json.dumps(messages[: first_user + 1], sort_keys=True, ensure_ascii=False)


def chat_template_hash(tokenizer_dir: str) -> str:
    from preprocessing.errors import BuildError
    from preprocessing.tokenizer import hf_tokenizer

    template = hf_tokenizer(tokenizer_dir).chat_template
    if not template:
        raise BuildError(f"{tokenizer_dir}: the tokenizer has no chat template (a base model's tokenizer?); SFT "
                         "renders conversations with it: use the instruct tokenizer or add chat_template")
    return template_sha(template)


def merge(recipe: SFTRecipe, samples: dict[str, int], token_counts: dict[str, int]) -> tuple[dict[str, dict], np.ndarray]:
    """One tokens and one mask dataset per split from the per-rank ones, holding the ``samples`` and
    ``token_counts`` the stage counted; checks they line up. A split without samples (``valid_fraction: 0``)
    gets no files and null prefixes. Returns the splits' summary and the training samples' lengths."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from preprocessing.steps import merge_indexed
    from preprocessing.tokenizer import hf_tokenizer, token_dtype

    out, work = recipe.out, recipe.out / "work"
    dtype = token_dtype(len(hf_tokenizer(str(recipe.resolve(recipe.tokenizer)))))
    result, lengths = {}, {}
    for split in SPLITS:
        if not samples[split]:  # megatron cannot open an empty dataset
            result[split] = {"tokens_prefix": None, "loss_mask_prefix": None, "samples": 0, "tokens": 0, "max_length": 0}
            lengths[split] = np.zeros(0, dtype=np.int64)
            continue
        for kind, kind_dtype in (("tokens", dtype), ("loss_mask", np.uint8)):
            merge_indexed(sorted((work / f"{split}_{kind}").glob("*.idx")), out / f"{split}_{kind}", kind_dtype,
                          samples[split], token_counts[split])
        tokens, masks = IndexedDataset(str(out / f"{split}_tokens")), IndexedDataset(str(out / f"{split}_loss_mask"))
        if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
            raise RuntimeError(f"{out}/{split}: token and mask datasets disagree in length; rebuild with --clean")
        n = lengths[split] = np.array(tokens.sequence_lengths)  # a copy: the index is an mmap closed with its dataset
        result[split] = {"tokens_prefix": f"{split}_tokens", "loss_mask_prefix": f"{split}_loss_mask",
                         "samples": int(len(n)), "tokens": int(n.sum()), "max_length": int(n.max())}
    return result, lengths["train"]


def write_report(recipe: SFTRecipe, ledger: dict, sft: dict, train_lengths: np.ndarray) -> None:
    import matplotlib

    from preprocessing.atomic import write_atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from preprocessing.report import balance

    out = recipe.out
    lines = ["# SFT data report", "", f"Output `{out}`; seq_length {recipe.seq_length}; loss on {recipe.loss_on} tokens; "
             f"chat template sha256 {sft['chat_template_sha256']}.", "",
             "| conversations | count |", "|---|---|", f"| read | {ledger['read']} |"]
    lines += [f"| quarantined: {reason} | {n} |" for reason, n in sorted(ledger["quarantined"].items())]
    lines += [f"| train | {ledger['kept']} |", f"| valid | {ledger['heldout']} |",
              f"| split into per-turn samples (template hides earlier reasoning) | {sft['split_into_turns']} |",
              f"| unaccounted | {balance(ledger)} |", "",
              "| split | samples | tokens | loss tokens | longest |", "|---|---|---|---|---|"]
    for split in SPLITS:
        s = sft[split]
        lines.append(f"| {split} | {s['samples']} | {s['tokens']:,} | {s['loss_tokens']:,} | {s['max_length']} |")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(train_lengths, bins=40)
    ax.axvline(recipe.seq_length + 1, color="red", linestyle="--", label="seq_length + 1")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=100)
    plt.close(fig)
    lines += ["", "![sample lengths](lengths.png)", ""]
    write_atomic(out / "report.md", "\n".join(lines))


def build(recipe: SFTRecipe, workers: int = 1, keep_work: bool = False) -> dict:
    """Run (or resume) the stage, merge, write ``sft.json`` and the report, then remove ``work/`` (the per-worker
    copies of every token and mask) unless ``keep_work``; returns sft.json's content."""
    from preprocessing.errors import BuildError, NoDocuments
    from preprocessing.atomic import write_json_atomic
    from preprocessing.pipeline import (built, check_settings, completed, input_files, make_executor, remove_work,
                                        started_tasks)
    from preprocessing.report import collect_ledger, no_survivors, stat_totals
    from preprocessing.tokenizer import bundle_tokenizer

    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = str(recipe.resolve(recipe.tokenizer))
    logs = out / "logs"
    tasks = started_tasks(logs / "tokenize", max(1, workers))  # a resumed build keeps its task count
    template_sha = chat_template_hash(tokenizer)
    check_settings(out / "settings.json", {**dataclasses.asdict(recipe), "base_dir": str(Path(recipe.base_dir).resolve()),
                                           "chat_template_sha256": template_sha, "input_files": input_files(recipe.files())})
    if (sft := built(out, "sft.json")) is not None:
        return sft
    if not completed(logs / "tokenize", tasks):
        pipeline = [ChatReader(recipe.files(), str(out / "errors"), recipe.roles),
                    ChatTokenWriter(str(out / "work"), str(out / "errors"), tokenizer, recipe)]
        make_executor("local", pipeline, tasks, workers, logs / "tokenize").run()
        if not completed(logs / "tokenize", tasks):
            raise BuildError(f"SFT tokenisation did not complete; see {logs / 'tokenize'} (rerun to resume)")
    full = collect_ledger(logs, [NAME])[NAME]
    ledger = {k: full[k] for k in ("read", "quarantined", "kept", "heldout")}
    stats = stat_totals(logs)
    count = lambda key: {split: int(stats.get(f"{key}/{split}", 0)) for split in SPLITS}  # noqa: E731
    if not count("samples")["train"]:
        raise NoDocuments(f"no training conversation survived stage tokenize: {no_survivors(NAME, full)} "
                          f"(records in {out / 'errors'}); fix the data or the recipe and rerun with --clean")
    splits, train_lengths = merge(recipe, count("samples"), count("tokens"))
    for split in SPLITS:
        splits[split]["loss_tokens"] = int(stats.get(f"loss_tokens/{split}", 0))
    sft = {"kind": "sft", "seq_length": recipe.seq_length, "tokenizer": bundle_tokenizer(tokenizer, out),  # relative
           "loss_on": recipe.loss_on, "chat_template_kwargs": recipe.chat_template_kwargs,  # evaluation prompts with them
           "chat_template_sha256": template_sha, "split_into_turns": int(stats.get("split_into_turns", 0)),
           **splits, "conversations": ledger}
    write_json_atomic(out / "sft.json", sft)
    write_report(recipe, full, sft, train_lengths)
    if not keep_work:
        remove_work(out)
    return sft


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="SFT recipe YAML (data/demo/sft_recipe.yaml is an example)")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel tokenize tasks (a resumed build keeps the task count it started with)")
    p.add_argument("--output-dir", help="override the recipe's output_dir")
    p.add_argument("--clean", action="store_true", help="delete output_dir first instead of resuming")
    p.add_argument("--keep-work", action="store_true", help="keep output_dir/work/ (per-worker intermediates) after the merge")
    p.add_argument("--verbose", action="store_true", help="every library's log on the console (always in output_dir/build_sft.log)")
    args = p.parse_args(argv)
    from preprocessing.pipeline import build_command, load_recipe

    recipe = load_recipe(SFTRecipe.load, args.config, **({"output_dir": str(Path(args.output_dir).resolve())} if args.output_dir else {}))
    with build_command(recipe.out, "build_sft", args.verbose, clean=args.clean):
        build(recipe, args.workers, args.keep_work)
    print((recipe.out / "report.md").read_text())


if __name__ == "__main__":
    main()
