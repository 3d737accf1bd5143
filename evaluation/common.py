"""What the evaluation tools share: loading a HF model directory, ``name=path`` arguments, atomic result files and
the finished (model, domain or task) results that let a rerun resume."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from preprocessing.atomic import merging, write_all_atomic, write_json_atomic
from preprocessing.cli import positive_int
from preprocessing.llm import cache_key
from preprocessing.steps import open_decompressed


def device_and_dtype(device: str | None) -> tuple[str, torch.dtype]:
    """The device to evaluate on (CUDA when present) and its dtype: bf16 on GPU, fp32 on CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_hf_model(model_dir: str | Path, device: str, dtype: torch.dtype = torch.float32):
    """transformers model and tokenizer of a HF directory, the model of the class its config's ``architectures``
    names: another class can take the checkpoint's tensors in part (a Qwen3.5-MoE release as the dense model,
    a tied release as ``Qwen3_5ForCausalLM``). A tensor the class needs that the checkpoint lacks is an error:
    transformers would draw it at random and print a table that no one reads, and every score would be off."""
    import transformers

    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"{model_dir}/config.json: architecture {arch!r} is not in transformers {transformers.__version__}")
    model, info = cls.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{model_dir}: {arch} needs {len(missing)} tensors the checkpoint lacks, e.g. "
                         f"{', '.join(missing[:3])}; they would be random")
    return model.to(device).eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def mask_padded_ids(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits with the ids past the tokenizer's ``vocab`` at -inf: checkpoints pad their embedding (Qwen3.5:
    248,320 rows for fewer tokens) and no text contains those ids, so they must get no probability."""
    return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab, float("-inf"))


def models_on_domains_parser(doc: str, model_help: str) -> argparse.ArgumentParser:
    """The command line that the per-domain comparisons (perplexity, MTP accuracy) share."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help=f"name=HF directory ({model_help})")
    p.add_argument("--data", action="append", required=True, help="domain=jsonl file with a 'text' field")
    p.add_argument("--max-docs", type=positive_int, help="read at most this many documents per domain (default: all)")
    p.add_argument("--device")
    return p


def run_models_on_domains(tool: str, args: argparse.Namespace, evaluate, to_markdown) -> None:
    """The per-domain comparisons' run: ``evaluate(models, data, units)`` resumably from ``OUT.units.json``, then
    ``OUT.json`` and ``OUT.md``. A failed model or a missing or malformed file stops it with one line; the
    finished results stay for a rerun."""
    units = Path(args.out).with_suffix(".units.json")
    try:
        report = evaluate(named_paths(args.model, "model"), named_paths(args.data, "data"), FinishedUnits(units))
    except ModelFailed as err:
        raise stopped(args.out, f"{tool} stopped: {err}\nFinished (model, domain) results are kept in {units}; "
                      "rerun the same command to resume.") from None
    except (ValueError, OSError) as err:  # a data file that is missing or malformed (named, with the line)
        raise SystemExit(f"{tool}: {err}") from None
    write_report(args.out, report, to_markdown(report))


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a jsonl file, compressed too (.gz, .bz2, .xz, .zst: held-out
    sets ship as the corpora do), decoded line by line: reading it as text would raise a UnicodeDecodeError at a
    bad byte that names neither the file nor the line."""
    with open_decompressed(str(path)) as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{i}: not UTF-8 text ({err})") from err
            if line.strip():
                yield i, line


def write_report(out: str | Path, report: dict, markdown: str, echo: bool = True) -> None:
    """``OUT.json`` (the full report) and ``OUT.md`` (its table), replaced together atomically; the table is
    printed too (``echo``)."""
    out = Path(out)
    write_all_atomic({out.with_suffix(".json"): json.dumps(report, indent=2), out.with_suffix(".md"): markdown})
    if echo:
        print(markdown)


def stopped(out: str | Path, message: str, suffixes: tuple[str, ...] = (".json", ".md")) -> SystemExit:
    """The exit of a run that stopped part-way (its finished units kept for a rerun). An earlier run's ``OUT.json``
    and ``OUT.md`` left in place would pass for this command's results in :mod:`evaluation.report`, with other
    models or checkpoints behind the same names; they are renamed ``OUT.earlier.*``, and the message says so."""
    out = Path(out)
    moved = [(out.with_suffix(x), out.with_suffix(".earlier" + x)) for x in suffixes if out.with_suffix(x).is_file()]
    for f, earlier in moved:
        os.replace(f, earlier)
    if moved:
        message += (f"\nAn earlier run's {', '.join(f.name for f, _ in moved)} did not come from this command: renamed "
                    f"{', '.join(earlier.name for _, earlier in moved)}.")
    return SystemExit(message)


def fingerprint(path: str | Path) -> list:
    """What identifies a data file's or checkpoint directory's content, cheaply: its resolved path, and the size and
    modification time of the file or of every file in the directory. A checkpoint or data file written again under the
    same path gets a new fingerprint; a path that does not exist (a hub name) is only its name."""
    p = Path(path).resolve()
    if not p.exists():
        return [str(path)]
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [str(p)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


class FinishedUnits:
    """Results of finished units of work (a model on a domain or task) in one JSON file, rewritten atomically as each
    finishes: a rerun skips them, and a failing model or a killed job loses none. A unit's key is a hash of everything
    its result depends on (:func:`fingerprint` of checkpoint and data, settings), so a changed one is run again.
    ``path`` None: kept in memory only."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        if not (self.path and self.path.is_file()):
            return {}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}: not a file of finished results ({err}); remove it to start over") from err

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, result: dict) -> None:
        """Keep ``result``, with what another run into the same file (one model per GPU, a command started twice)
        finished meanwhile: each rewrote the file from what it alone held, dropping the other's results."""
        self.entries[key] = result
        if self.path:
            with merging(self.path):
                self.entries = {**self._read(), **self.entries}
                write_json_atomic(self.path, self.entries, indent=1)


class ModelFailed(RuntimeError):
    """One model's evaluation failed (the message names it); the other models' finished results are kept."""


def each_model_on_each_domain(kind: str, models: dict[str, str], data: dict[str, str], settings: tuple,
                              units: FinishedUnits, load, score) -> dict[str, dict[str, dict]]:
    """``results[domain][name]`` of every model on every domain, resumably. A (model, domain) result finished before
    comes from ``units``; the others are ``score(load(model_dir), name, domain)``, a model loaded only when it has
    domains left, each result put into ``units`` as it finishes. A unit's key: ``kind``, the :func:`fingerprint` of
    checkpoint and data file, and ``settings``. Raises :class:`ModelFailed` naming the model (and, for a
    ValueError, the domain's file)."""
    data_ids = {domain: fingerprint(path) for domain, path in data.items()}
    results: dict[str, dict[str, dict]] = {d: {} for d in data}
    for name, model_dir in models.items():
        model_id = fingerprint(model_dir)
        keys = {d: cache_key(kind, model_id, data_ids[d], *settings) for d in data}
        todo = [d for d in data if units.get(keys[d]) is None]
        if len(todo) < len(data):
            print(f"{name}: {len(data) - len(todo)} of {len(data)} domains finished before, kept")
        if todo:
            try:
                loaded = load(model_dir)
                for domain in todo:
                    try:
                        result = score(loaded, name, domain)
                    except ValueError as err:
                        raise ValueError(f"{data[domain]} (domain {domain!r}): {err}") from err
                    units.put(keys[domain], result)
                del loaded
            except Exception as err:
                raise ModelFailed(f"model {name} ({model_dir}): {err}") from err
        for domain in data:
            results[domain][name] = dict(units.get(keys[domain]))
    return results


def named_paths(items: list[str], what: str) -> dict[str, str]:
    """``name=path`` command-line items as an ordered dict, with a clear error for a malformed one or a name given twice
    (the later would silently replace the earlier)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--{what} {item!r}: expected name=path")
        if name in out:
            raise SystemExit(f"--{what} {item!r}: the name {name!r} is given twice")
        out[name] = value
    return out
