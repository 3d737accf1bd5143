"""The mix recipe: a YAML file of dataclasses (see data/demo/recipe.yaml for a complete example)."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preprocessing.llm import LLMConfig
from preprocessing.phi import PHIModel, model_labels

FORMATS = ("jsonl", "csv", "parquet", "latex", "text")  # jsonl, csv: .gz .bz2 .xz .zst too; csv: .tsv too (tab-separated)
ONE_DOCUMENT_PER_FILE = ("latex", "text")  # formats whose files are a document each, named by their path


def from_dict(cls, raw: dict | Any, where: str):
    """``cls(**raw)`` with unknown and missing keys named in the error (a typo must not silently switch a feature
    off, nor end in a Python TypeError naming no source)."""
    if not isinstance(raw, dict):
        return raw
    fields = dataclasses.fields(cls)
    unknown = sorted(set(raw) - {f.name for f in fields})
    missing = [f.name for f in fields if f.name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        raise ValueError(f"{where}: " + "; ".join(([f"unknown keys {unknown}"] if unknown else [])
                                                  + ([f"missing keys {missing}"] if missing else [])))
    return cls(**raw)


def _source(raw: dict, index: int) -> SourceConfig:
    """A recipe's ``sources:`` entry, named by its ``name`` (else its place) in an error."""
    if not isinstance(raw, dict):
        raise ValueError(f"source {index}: expected a mapping of keys (name, paths, share, ...), got {raw!r}")
    return from_dict(SourceConfig, raw, f"source {raw.get('name', index)!s}")


@dataclass
class FilterConfig:
    """Quality filters for one source; datatrove's Gopher filters with their own keyword arguments.
    ``None`` switches a filter off. Clinical notes are terse: relax word length, symbols and stop words."""

    min_chars: int = 200
    gopher_quality: dict[str, Any] | None = field(default_factory=dict)
    gopher_repetition: dict[str, Any] | None = field(default_factory=dict)


@dataclass
class EnrichConfig:
    """LLM enrichment of one source (``preprocessing/enrich_data.py``): ``classify`` keep/drop for medical
    relevance and quality; ``expand`` documents shorter than ``expand_below_words`` words into an extra,
    synthetic explanatory document; ``arxiv`` subfield and residual-LaTeX clean-up. ``on_failure``: what
    happens to a document whose classify or arxiv answer stayed malformed (or whose request failed)."""

    classify: bool = False
    expand: bool = False
    arxiv: bool = False
    expand_below_words: int = 150
    on_failure: str = "keep"  # or "drop"

    def __post_init__(self) -> None:
        if not (self.classify or self.expand or self.arxiv):
            raise ValueError("an enrich block must switch on at least one of classify, expand, arxiv")
        if self.on_failure not in ("keep", "drop"):
            raise ValueError(f"enrich.on_failure must be keep or drop, not {self.on_failure!r}")
        if self.expand_below_words < 1:
            raise ValueError("enrich.expand_below_words must be positive")


@dataclass
class EnrichLLMConfig(LLMConfig):
    """The recipe's ``llm:`` block: the model and server (:class:`preprocessing.llm.LLMConfig`) plus how the
    enrichment feeds it."""

    cache_dir: str | None = None  # default <output_dir>/llm_cache; relative paths against the recipe file
    batch_size: int = 64  # documents per batch (a batch's requests run concurrently)
    max_input_chars: int = 24_000  # longer documents are sent truncated (classification and arXiv clean-up)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1 or self.max_input_chars < 1:
            raise ValueError("llm.batch_size and llm.max_input_chars must be positive")


@dataclass
class PHIModelConfig:
    """The recipe's ``phi_model:`` block: a de-identification model run beside the PHI guard's rules on every
    ``phi_guard`` source (a local transformers token-classification folder, e.g. one trained on i2b2 2014 notes)."""

    path: str  # relative paths against the recipe file
    labels: dict[str, str | None] = field(default_factory=dict)  # model label -> kind or null, over phi.MODEL_LABELS
    device: str = "auto"  # cpu, cuda, cuda:N; auto: the node's GPUs, one per build worker in turn (phi.model_device)
    batch_size: int | None = None  # chunks a forward pass takes; null: 32 on a GPU, 1 on a CPU (phi.model_batch_size)

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.removeprefix("cuda:").isdigit()):
            raise ValueError(f"phi_model.device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"phi_model.batch_size must be positive, not {self.batch_size}")


@dataclass
class SourceConfig:
    name: str
    paths: list[str]
    share: float
    format: str = "jsonl"
    text_key: str = "text"
    id_key: str = "id"
    chunk_overlap: int = 0
    phi_guard: bool = False
    phi_policy: str = "redact"  # or "drop"
    # records kept by their fields, {field: [values]}, all fields matching (e.g. MIMIC-III's CATEGORY and ISERROR)
    select: dict[str, list] = field(default_factory=dict)
    filters: FilterConfig = field(default_factory=FilterConfig)
    enrich: EnrichConfig | None = None  # LLM enrichment; off unless given

    def __post_init__(self) -> None:
        if isinstance(self.filters, dict):
            self.filters = FilterConfig(**self.filters)
        self.enrich = from_dict(EnrichConfig, self.enrich, f"source {self.name}: enrich")
        if self.format not in FORMATS:
            raise ValueError(f"source {self.name}: format {self.format!r} is not one of {FORMATS}")
        if self.phi_policy not in ("redact", "drop"):
            raise ValueError(f"source {self.name}: phi_policy must be redact or drop")
        if not self.name.isidentifier():
            raise ValueError(f"source name {self.name!r} must be a plain identifier (it names files)")
        if self.select and self.format in ONE_DOCUMENT_PER_FILE:
            raise ValueError(f"source {self.name}: select needs records with fields; a {self.format} file is only text")
        for key, values in (self.select or {}).items():
            if not (isinstance(values, list) and values):
                raise ValueError(f"source {self.name}: select.{key} must be a list of the values to keep, got {values!r}")
            if untyped := [v for v in values if not isinstance(v, str)]:
                # YAML reads 1.0, 007 (octal: 7), true, no and null as numbers, booleans and None, whose text would
                # not be the data's ("1.0" never matches a CSV's "1"): the build would keep nothing, silently
                raise ValueError(f"source {self.name}: select.{key} holds {untyped[0]!r} ({type(untyped[0]).__name__}), "
                                 f"not text: select compares text, so quote each value as the data writes it "
                                 f"(e.g. ['1', 'false', ''])")


@dataclass
class MixRecipe:
    tokenizer: str
    output_dir: str
    sources: list[SourceConfig]
    seq_length: int = 4096
    token_budget: int = 600_000_000
    heldout_fraction: float = 0.01
    decontaminate: list[str] = field(default_factory=list)
    decontaminate_ngram: int = 13
    max_doc_chars: int = 5_000_000  # larger records are quarantined, not read into the pipeline (nor a jsonl line of
    # over 16 bytes a character parsed: steps.line_byte_limit)
    minhash: dict[str, int] = field(default_factory=lambda: {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8})
    seed: int = 1234
    llm: EnrichLLMConfig | None = None  # needed when a source has ``enrich``
    phi_model: PHIModelConfig | None = None  # a de-identification model beside the PHI guard's rules
    base_dir: str = "."  # relative paths in the recipe resolve against the recipe file's folder

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else _source(s, i) for i, s in enumerate(self.sources)]
        self.llm = from_dict(EnrichLLMConfig, self.llm, "llm")
        self.phi_model = from_dict(PHIModelConfig, self.phi_model, "phi_model")
        if self.phi_model:
            if not any(s.phi_guard for s in self.sources):
                raise ValueError("phi_model is set, but no source has phi_guard: true (the model runs with the guard)")
            self.phi_model_spec  # read now: a missing folder or a label without a kind stops the load, in one line
        if self.enriched_sources and self.llm is None:
            raise ValueError(f"sources {self.enriched_sources} have enrich blocks but the recipe has no llm: block")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate source names in {names}")
        total = sum(s.share for s in self.sources)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"source shares sum to {total}, not 1")
        for s in self.sources:  # checked here, not after hours of dedup when the last stage chunks a long document
            if not 0 <= s.chunk_overlap < self.seq_length - 1:
                raise ValueError(f"source {s.name}: chunk_overlap {s.chunk_overlap} must be in [0, {self.seq_length - 1}) "
                                 f"(a chunk holds seq_length {self.seq_length} - 1 tokens and EOS)")

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "MixRecipe":
        path = Path(path)
        raw = yaml.safe_load(path.read_text())
        raw.update(overrides)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}")
        raw["base_dir"] = str(path.parent / raw.get("base_dir", "."))  # relative to the recipe file
        return cls(**raw)

    def resolve(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else Path(os.path.normpath(Path(self.base_dir) / q))

    def expand(self, pattern: str) -> list[Path]:
        """Files matching a (recursive) glob, relative to the recipe's folder unless absolute."""
        import glob

        return sorted(Path(p) for p in set(glob.glob(str(self.resolve(pattern)), recursive=True)) if Path(p).is_file())

    def source_files(self) -> list[tuple[SourceConfig, str]]:
        files = []
        for s in self.sources:
            found = sorted({p for pattern in s.paths for p in self.expand(pattern)})
            if not found:
                raise FileNotFoundError(f"source {s.name}: no files match {s.paths} (relative to {self.base_dir})")
            files += [(s, str(p)) for p in found]
        return files

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)

    @functools.cached_property
    def phi_model_spec(self) -> PHIModel | None:
        """The PHI guard's model as the steps take it, its labels checked against the kinds (files read here)."""
        if self.phi_model is None:
            return None
        path = str(self.resolve(self.phi_model.path))
        device = None if self.phi_model.device == "auto" else self.phi_model.device
        return PHIModel(path, model_labels(path, self.phi_model.labels), device, self.phi_model.batch_size)

    @property
    def enriched_sources(self) -> list[str]:
        return [s.name for s in self.sources if s.enrich is not None]

    @property
    def llm_cache(self) -> Path:
        return self.resolve(self.llm.cache_dir) if self.llm and self.llm.cache_dir else self.out / "llm_cache"
