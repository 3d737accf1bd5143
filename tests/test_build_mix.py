"""The mix build on the demo corpus and on crafted bad input: accounting, dedup, PHI, decontamination,
megatron-readable binaries, blend shares through megatron's sampler, resume after a kill."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import compressed, hold_in_another_process, own_session, processes_left_by_sigterm

from preprocessing import build_mix, pipeline
from preprocessing.errors import BuildError, NoDocuments
from preprocessing.recipe import MixRecipe
from preprocessing.report import balance
from preprocessing.steps import chunk_tokens

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def _recipe(tmp: Path, **overrides) -> Path:
    """The demo recipe, writing into ``tmp``."""
    raw = yaml.safe_load((DEMO / "recipe.yaml").read_text())
    raw.update(output_dir=str(tmp / "mix"), base_dir=str(DEMO), **overrides)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def demo_mix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    recipe = MixRecipe.load(_recipe(tmp))
    return recipe, build_mix.build(recipe)


def _decoded(recipe: MixRecipe, source: str) -> list[str]:
    """Every training document of a source, decoded, whitespace removed (the toy BPE drops spaces)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(recipe.resolve(recipe.tokenizer) / "tokenizer.json"))
    ds = IndexedDataset(str(recipe.out / f"{source}_text_document"))
    return ["".join(tok.decode(ds[i].tolist()).split()) for i in range(len(ds))]


# the identifier lines of preprocessing.demo_corpus.clinical_note
DEMO_PHI = re.compile(r"Patient: (.+?)  MRN: (\d+)  DOB: (\S+)|phone (\(\d{3}\) [\d-]+), email (\S+), home (.+?)\. "
                      r"SSN ([\d-]+)\. Portal: (\S+)")


def _squash(text: str) -> str:
    return "".join(text.split())


def test_counts_add_up_and_report_exists(demo_mix):
    recipe, mix = demo_mix
    ledger = json.loads((recipe.out / "mix.json").read_text())["sources"]
    report = (recipe.out / "report.md").read_text()
    from preprocessing.report import collect_ledger

    full = collect_ledger(recipe.out / "logs", list(ledger))
    for source, entry in full.items():
        assert entry["read"] > 0
        assert balance(entry) == 0, (source, entry)  # in = quarantined + each drop reason + held out + kept
        assert entry["kept"] > 0.5 * entry["read"], source  # per-source thresholds keep most of every source
        assert f"| {source} | {entry['read']} |" in report
    assert full["ehr"]["quarantined"] == {"malformed_json": 1}
    assert (recipe.out / "report_documents.png").stat().st_size > 5000
    assert (recipe.out / "report_tokens.png").stat().st_size > 5000
    errors = [json.loads(x) for f in (recipe.out / "errors").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert errors == [{"file": str(DEMO / "ehr" / "notes_1.jsonl"), "line": 8, "reason": "malformed_json",
                       "excerpt": errors[0]["excerpt"]}]


def test_work_is_removed_after_the_merge_and_a_rerun_is_a_no_op(demo_mix):
    recipe, mix = demo_mix
    assert not (recipe.out / "work").exists()  # the per-worker copies of every token are gone
    assert (recipe.out / "logs" / "final" / "completions").is_dir()
    assert build_mix.build(recipe) == mix  # the same command again: already built, nothing to redo


def test_planted_duplicates_removed_across_sources(demo_mix):
    recipe, _ = demo_mix
    from preprocessing.report import collect_ledger

    ledger = collect_ledger(recipe.out / "logs", [s.name for s in recipe.sources])
    dropped = {s: e["dropped"] for s, e in ledger.items()}
    assert dropped["ehr"].get("near_duplicate", 0) >= 4
    # the abstract cross-posted into the general-medical parquet is an exact duplicate across sources
    assert dropped["general_medical"].get("exact_duplicate", 0) + dropped["pubmed_neuro"].get("exact_duplicate", 0) == 1
    notes = [json.loads(line) for line in (DEMO / "ehr" / "notes_0.jsonl").read_text().splitlines()]
    survivors = _decoded(recipe, "ehr") + [_squash(json.loads(x)["text"]) for x in
                                           (recipe.out / "heldout" / "ehr.jsonl").read_text().splitlines()]
    for j in range(4):  # each planted pair (note 10+j and its edited copy) leaves exactly one document
        hpi = _squash(next(line for line in notes[10 + j]["text"].split("\n") if line.startswith("HPI")))
        assert sum(hpi in doc for doc in survivors) == 1


def test_planted_phi_and_benchmark_text_are_gone(demo_mix):
    recipe, _ = demo_mix
    raw = "\n".join(json.loads(x)["text"] for f in sorted((DEMO / "ehr").glob("*.jsonl"))
                    for x in f.read_text().splitlines() if x.startswith('{"id": "note-') and x.endswith("}"))
    planted = {v for m in DEMO_PHI.finditer(raw) for v in m.groups() if v}  # what demo_corpus planted
    assert len(planted) > 100
    training = "\n".join(_decoded(recipe, "ehr"))
    assert "CHIEFCOMPLAINT" in training  # the check below can see text at all
    leaked = [p for p in planted if _squash(p) in training]
    assert not leaked
    english = "\n".join(_decoded(recipe, "english"))
    assert "Quiznightatthelibrary" not in english and len(english) > 1000


def test_binaries_are_megatron_datasets_ending_in_eos(demo_mix):
    recipe, mix = demo_mix
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(recipe.resolve(recipe.tokenizer)).eos_token_id
    for source, entry in mix["sources"].items():
        ds = IndexedDataset(str(recipe.out / entry["prefix"]))
        assert len(ds) == entry["documents"] > 0
        assert sum(len(ds[i]) for i in range(len(ds))) == entry["tokens"]
        assert all(ds[i][-1] == eos and len(ds[i]) <= recipe.seq_length for i in range(len(ds)))
        assert ds[0].dtype == np.uint16  # vocab 2048; int32 above 65535
        heldout = (recipe.out / entry["heldout"]).read_text().splitlines()
        training = set(_decoded(recipe, source))
        assert all(_squash(json.loads(x)["text"]) not in training for x in heldout)
    assert sum(len((recipe.out / e["heldout"]).read_text().splitlines()) for e in mix["sources"].values()) > 0


def test_special_token_strings_in_documents_are_text(tmp_path):
    """A literal '<|endoftext|>' or '<|im_start|>' in a document (a scraped page, a paper about LLMs) is tokenised as
    its characters: as the control tokens it ended the document mid-text and taught chat markup out of place. The
    trainer's held-out batches agree; chat rendering (SFT) still reads them as the tokens."""
    from datatrove.data import Document
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data import heldout_batches
    from preprocessing.steps import MegatronTokenWriter
    from preprocessing.tokenizer import eos_id, hf_tokenizer

    tokenizer = str(DEMO / "tokenizer")
    text = "Prompt injection: the page said <|endoftext|> then <|im_start|>user hello."
    writer = MegatronTokenWriter(str(tmp_path / "tokens"), tokenizer, seq_length=4096, overlaps={})
    list(writer.run([Document(text=text, id="d", metadata={"source": "web"})]))
    dataset = IndexedDataset(str(tmp_path / "tokens" / "web" / "00000"))  # held: its tokens are in an mmap it closes
    ids = dataset[0].tolist()
    hf, eos = hf_tokenizer(tokenizer), eos_id(tokenizer)
    assert ids.count(eos) == 1 and ids[-1] == eos and hf.decode(ids[:-1]) == text
    assert not set(ids[:-1]) & set(hf.all_special_ids)
    (tmp_path / "heldout.jsonl").write_text(json.dumps({"text": text}) + "\n")
    batches = heldout_batches({"dir": str(tmp_path), "sources": {"web": {"heldout": "heldout.jsonl"}}}, tokenizer,
                              seq_length=64, max_docs=1, micro_batch_size=1, eod=eos)
    assert batches["web"][0]["tokens"][0, : len(ids)].tolist() == ids
    assert hf("<|im_start|>", add_special_tokens=False).input_ids == [hf.convert_tokens_to_ids("<|im_start|>")]


def test_blend_shares_through_megatron_sampler(demo_mix):
    recipe, mix = demo_mix
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

    class Tok(MegatronLegacyTokenizer):  # megatron's dataset wants a tokenizer object for the EOD id only
        def __init__(self):
            super().__init__("demo")
        vocab_size, vocab, inv_vocab, eod = 2048, {}, {}, 1
        def tokenize(self, text):
            raise NotImplementedError
        def detokenize(self, ids):
            raise NotImplementedError

    paths = [str(recipe.out / p) if isinstance(p, str) else p for p in mix["data_path"]]
    config = GPTDatasetConfig(random_seed=1, sequence_length=recipe.seq_length, blend=(paths[1::2], paths[0::2]),
                              split="100,0,0", tokenizer=Tok(), reset_position_ids=True, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=str(recipe.out / "cache"), mid_level_dataset_surplus=0.005)
    n = 20000
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, config).build()
    counts = np.bincount(train.dataset_index[:n], minlength=len(mix["sources"]))
    for k, (source, entry) in enumerate(mix["sources"].items()):
        assert abs(counts[k] / n - entry["share"]) < 0.01, source


def test_the_trainers_index_cache_follows_the_files_not_their_paths(demo_mix, tmp_path):
    """megatron keys its blend's index cache by paths, sample count, length and seed: a source rebuilt in place (a new
    mix synced over the old one) had its old indices reused, an IndexError with fewer documents and other rows read
    silently with more. The trainer names its cache by the files' fingerprint: the rows are a fresh build's."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_ext.data import build_train_dataset, fingerprint, read_data_json

    recipe, _ = demo_mix
    out = tmp_path / "mix"
    shutil.copytree(recipe.out, out, ignore=shutil.ignore_patterns("cache"))

    def rows() -> list[list[int]]:
        info = read_data_json(out / "mix.json", "build_mix")
        sources = info["sources"]
        files = fingerprint({n: str(out / s["prefix"]) for n, s in sources.items()}, {n: s["weight"] for n, s in sources.items()})
        dataset = build_train_dataset(info, 64, 300, 0, 2048, 1, files)
        return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]

    before = rows()
    prefix = str(out / read_data_json(out / "mix.json", "build_mix")["sources"]["english"]["prefix"])
    old = IndexedDataset(prefix)
    fewer = IndexedDatasetBuilder(f"{prefix}.new.bin", dtype=old.index.dtype)
    for i in range(10):
        fewer.add_document(old[i][:20], [20])
    fewer.finalize(f"{prefix}.new.idx")
    del old
    for ext in ("bin", "idx"):
        os.replace(f"{prefix}.new.{ext}", f"{prefix}.{ext}")
    after = rows()  # the old cache would give indices past the 10 documents: IndexError
    assert after != before
    shutil.rmtree(out / "cache")
    assert rows() == after
    # a .bin cut short (an interrupted copy) is named before training, not read past its end hours in
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(os.path.getsize(f"{prefix}.bin") - 2)
    with pytest.raises(ValueError, match=re.escape(f"{prefix}.bin: ") + r"\d+ bytes where its index .* needs \d+: truncated"):
        rows()
    open(f"{prefix}.bin", "w").close()  # cut to nothing: megatron's mmap refused it naming no file
    with pytest.raises(ValueError, match=re.escape(f"{prefix}.bin: 0 bytes where its index")):
        rows()


def test_an_index_cut_short_in_the_trainers_cache_is_built_again(demo_mix, tmp_path, caplog):
    """megatron writes its index cache with numpy.save and takes it as built once every file exists: a first run killed
    while it wrote the last index left a cache that every rerun failed on at start ("mmap length is greater than file
    size", naming no file). The cut index is removed, with a warning naming it, and built again: the same rows."""
    from megatron_ext.data import build_train_dataset, fingerprint, read_data_json

    recipe, _ = demo_mix
    out = tmp_path / "mix"
    shutil.copytree(recipe.out, out, ignore=shutil.ignore_patterns("cache"))
    info = read_data_json(out / "mix.json", "build_mix")
    files = fingerprint({n: str(out / s["prefix"]) for n, s in info["sources"].items()},
                        {n: s["weight"] for n, s in info["sources"].items()})

    def rows() -> list[list[int]]:
        dataset = build_train_dataset(info, 64, 300, 0, 2048, 1, files)
        return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]

    before = rows()
    last = max((out / "cache").rglob("*.npy"), key=lambda p: p.stat().st_mtime_ns)  # the one written last
    for size in (last.stat().st_size // 2, 0):  # killed inside its numpy.save; killed as it opened the file
        with open(last, "r+b") as f:
            f.truncate(size)
        caplog.clear()
        assert rows() == before
        assert f"{last} is cut short" in caplog.text


def test_chunking_overlaps_and_ends_with_eos():
    ids = list(range(100, 130))
    chunks = list(chunk_tokens(ids, eos=0, seq_length=11, overlap=3))
    assert all(c[-1] == 0 and len(c) <= 11 for c in chunks)
    bodies = [c[:-1] for c in chunks]
    assert bodies[0] == ids[:10] and bodies[1][:3] == ids[7:10]  # 3 tokens of overlap
    assert bodies[-1][-1] == ids[-1]
    assert list(chunk_tokens([5, 6], eos=0, seq_length=11, overlap=3)) == [[5, 6, 0]]
    # every length around the chunk boundaries: each token once in order (overlaps aside), every chunk after the first
    # brings new tokens (no chunk of overlap or EOS alone), and no more chunks than the length needs
    for n in range(1, 40):
        for overlap in (0, 3):
            ids = list(range(100, 100 + n))
            bodies = [c[:-1] for c in chunk_tokens(ids, eos=0, seq_length=11, overlap=overlap)]
            assert all(len(b) > overlap for b in bodies[1:]) and bodies[0], (n, overlap, bodies)
            assert all(b[:overlap] == a[len(a) - overlap:] for a, b in zip(bodies, bodies[1:])), (n, overlap)
            assert bodies[0] + [t for b in bodies[1:] for t in b[overlap:]] == ids, (n, overlap)
            assert len(bodies) == (1 if n <= 10 else 1 + -(-(n - 10) // (10 - overlap))), (n, overlap)


def test_each_source_is_chunked_with_its_own_overlap(tmp_path):
    """The writer chunks a long document with its source's chunk_overlap (the demo's documents all fit one chunk, so
    the end-to-end tests never see an overlap applied)."""
    from datatrove.data import Document
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from preprocessing.steps import MegatronTokenWriter
    from preprocessing.tokenizer import eos_id, text_tokenizer

    tokenizer = str(DEMO / "tokenizer")
    text = " ".join(f"The patient number {i} was seen in clinic for headache lasting {i + 2} days." for i in range(20))
    ids, eos = text_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids, eos_id(tokenizer)
    assert len(ids) > 3 * 32
    writer = MegatronTokenWriter(str(tmp_path / "tokens"), tokenizer, seq_length=32, overlaps={"ehr": 8, "web": 0})
    list(writer.run([Document(text=text, id=f"{s}/d", metadata={"source": s}) for s in ("ehr", "web")]))
    for source, overlap in (("ehr", 8), ("web", 0)):
        dataset = IndexedDataset(str(tmp_path / "tokens" / source / "00000"))
        assert [dataset[i].tolist() for i in range(len(dataset))] == list(chunk_tokens(ids, eos, 32, overlap)), source
        del dataset


def test_bad_input_is_quarantined_and_counted(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = "The patient was admitted with a transient ischemic attack and recovered fully within a day. " * 4
    other = "Follow-up MRI of the spine showed no new demyelinating lesions; gait has improved since June. " * 4
    lines = [json.dumps({"text": good}).encode(), b'{"text": "unterminated',
             json.dumps({"body": good}).encode(), b'{"text": "caf\xe9 au lait ' + b"x" * 50 + b'"}',
             json.dumps({"text": "   "}).encode(), json.dumps({"text": "A" * 50_000_001}).encode(),
             json.dumps({"text": other}).encode()]
    (raw / "notes.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (raw / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    shutil.copytree(DEMO / "tokenizer", tmp_path / "tok")
    recipe = MixRecipe(tokenizer=str(tmp_path / "tok"), output_dir=str(tmp_path / "out"), seq_length=64, heldout_fraction=0.0,
                       max_doc_chars=10_000_000, base_dir=str(tmp_path),
                       sources=[{"name": "notes", "paths": ["raw/*.jsonl*"], "share": 1.0,
                                 "filters": {"min_chars": 10, "gopher_quality": None, "gopher_repetition": None}}])
    mix = build_mix.build(recipe, keep_work=True)
    assert sorted(p.name for p in (tmp_path / "out" / "work" / "tokens" / "notes").iterdir()) == ["00000.bin", "00000.idx"]
    errors = [json.loads(x) for f in (tmp_path / "out" / "errors").glob("*.jsonl") for x in f.read_text().splitlines()]
    by_reason = {e["reason"]: e for e in errors}
    assert set(by_reason) == {"malformed_json", "missing_text_key", "non_utf8", "empty", "too_large", "unreadable_file"}
    assert by_reason["malformed_json"]["line"] == 2 and by_reason["too_large"]["line"] == 6
    assert by_reason["unreadable_file"]["file"].endswith("broken.jsonl.gz")
    from preprocessing.report import collect_ledger

    entry = collect_ledger(tmp_path / "out" / "logs", ["notes"])["notes"]
    assert entry["kept"] == 2 and balance(entry) == 0 and sum(entry["quarantined"].values()) == 6
    assert mix["sources"]["notes"]["documents"] >= 2
    # heldout_fraction 0: an empty held-out file, which the trainer reads as no validation set for the source
    from megatron_ext.data import heldout_batches

    assert (tmp_path / "out" / mix["sources"]["notes"]["heldout"]).read_text() == ""
    assert heldout_batches({**mix, "dir": str(tmp_path / "out")}, str(tmp_path / "tok"), 64, 4, 1, eod=0) == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_huge_line_is_quarantined_without_being_read_whole_or_parsed(tmp_path, monkeypatch, suffix):
    """A line longer than 16 bytes per max_doc_chars is too large whatever it holds: it is quarantined with its file,
    line and size, skipped a piece at a time (never in memory whole) and never given to the JSON parser; the lines
    around it are read as usual."""
    import tracemalloc

    import orjson

    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader

    huge = b'{"text": "' + b"x" * (20 << 20) + b'"}'  # 20 MiB on one line; the limit below is 16,000 bytes
    body = b"".join([json.dumps({"text": "A short note about a transient ischemic attack."}).encode() + b"\n", huge + b"\n",
                     json.dumps({"text": "x" * 999, "id": "n3"}).encode() + b"\n"])  # within the limit: read
    path = tmp_path / f"notes{suffix}"
    path.write_bytes(compressed(body, suffix))
    parsed, real = [], orjson.loads
    monkeypatch.setattr(orjson, "loads", lambda raw: parsed.append(len(raw)) or real(raw))
    reader = MixReader([(SourceConfig("notes", [str(path)], 1.0), str(path))], str(tmp_path / "errors"), max_doc_chars=1000)
    tracemalloc.start()
    try:
        docs = list(reader.run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.metadata["line"] for d in docs] == [1, 3] and docs[1].id == "notes/n3"
    assert len(parsed) == 2 and max(parsed) < 16_000  # the huge line never reached the parser
    assert peak < 4 << 20  # reading it whole would take its 20 MiB
    [error] = [json.loads(x) for x in (tmp_path / "errors" / "read_00000.jsonl").read_text().splitlines()]
    assert (error["file"], error["line"], error["reason"]) == (str(path), 2, "too_large")
    assert error["excerpt"].startswith(f"line of {len(huge) + 1} bytes, over the limit of 16000 (16 bytes per "
                                       'max_doc_chars), not parsed: {"text": "xxx')


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_jsonl_and_tsv_read_as_the_plain_files(tmp_path, compression):
    """Corpora ship compressed (zstd: Dolma, RedPajama; MIMIC: gzip): a jsonl or csv/tsv source's files are read
    through their compression, by suffix, as the plain file reads (records, ids, lines, quarantine, the tsv's tab
    by the name under the suffix), and a guarded source's runs of lines count and skip the same. Before, any but gzip
    was read as the compressed bytes: every line quarantined as not UTF-8."""
    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader, count_lines, jsonl_records

    lines = [json.dumps({"text": f"Seen in clinic, visit {i}.", "id": f"v{i}" if i % 2 else None}) for i in range(6)]
    lines[3] = '{"text": "cut off'
    jsonl = ("\n".join(lines) + "\n").encode()
    tsv = 'note_id\ttext\nN1\t"A note\nover two lines"\nN2\tSeen, and sent home.\n'.encode()
    notes, ehr = SourceConfig("notes", [], 0.5), SourceConfig("ehr", [], 0.5, format="csv", id_key="note_id")

    def read(suffix: str) -> tuple[list, list]:
        folder = tmp_path / (suffix or "plain")
        folder.mkdir()
        (folder / f"a.jsonl{suffix}").write_bytes(compressed(jsonl, suffix))
        (folder / f"b.tsv{suffix}").write_bytes(compressed(tsv, suffix))
        files = [(notes, str(folder / f"a.jsonl{suffix}")), (ehr, str(folder / f"b.tsv{suffix}"))]
        docs = [(d.id.replace(suffix, ""), d.text, d.metadata["line"]) for d in MixReader(files, str(folder / "e"), 1000).run()]
        errors = [(json.loads(x)["line"], json.loads(x)["reason"]) for x in (folder / "e" / "read_00000.jsonl").read_text().splitlines()]
        path = str(folder / f"a.jsonl{suffix}")
        assert count_lines(path) == 6 and [r for _, r, _ in jsonl_records(path, lines=(5, 6))] == [json.loads(x) for x in lines[4:]]
        return docs, errors

    plain = read("")
    assert plain[0][-2:] == [("ehr/N1", "A note\nover two lines", 1), ("ehr/N2", "Seen, and sent home.", 2)]
    assert plain[1] == [(4, "malformed_json")] and len(plain[0]) == 7
    assert read(compression) == plain


def test_a_guarded_sources_records_are_shared_by_all_tasks_however_its_files_come(tmp_path):
    """The PHI guard is the build's costliest step, and notes often come as one large export: with files kept whole a
    single notes file ran the guard on one task whatever --workers said. A ``phi_guard`` source's jsonl, csv and parquet
    records are shared by every task instead (runs of consecutive records: the dedup stages keep the first copy of a
    duplicate in the tasks' order), each read once, with the ids, line numbers and quarantine entries of a one-task
    read; other sources' files stay whole, one task each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader

    notes, web = SourceConfig("notes", [], 0.5, phi_guard=True), SourceConfig("web", [], 0.3)
    table = SourceConfig("table", [], 0.2, format="parquet", phi_guard=True)
    export = SourceConfig("export", [], 0.2, format="csv", phi_guard=True)
    lines = [json.dumps({"text": f"Seen in clinic, visit {i}."}) for i in range(10)]
    lines[4], lines[7] = '{"text": "cut off', json.dumps({"text": "x" * 2000})  # malformed; too large (>16 bytes/char)
    (tmp_path / "notes.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a note"}\n' * 50)[:-20])  # cut: unreadable
    pq.write_table(pa.table({"text": [f"Row {i} of the table." for i in range(7)]}), tmp_path / "notes.parquet")
    (tmp_path / "export.csv").write_text("text\n" + "".join(f'"Note {i},\nacross lines."\n' for i in range(5))
                                         .replace('"Note 2,\nacross lines."', "Note 2,with,fields"))  # malformed
    for k in range(4):
        (tmp_path / f"web{k}.jsonl").write_text(json.dumps({"text": f"Page {k}."}) + "\n")
    files = [(notes, str(tmp_path / "notes.jsonl")), (notes, str(tmp_path / "broken.jsonl.gz")),
             (table, str(tmp_path / "notes.parquet")), (export, str(tmp_path / "export.csv"))] + [(web, str(tmp_path / f"web{k}.jsonl")) for k in range(4)]

    def read(world_size):
        docs, errors = [], []
        for rank in range(world_size):
            reader = MixReader(files, str(tmp_path / f"errors_{world_size}"), max_doc_chars=100)
            docs.append([d.id for d in reader.run(rank=rank, world_size=world_size)])
            path = tmp_path / f"errors_{world_size}" / f"read_{rank:05d}.jsonl"
            errors += sorted(json.dumps(json.loads(x), sort_keys=True) for x in path.read_text().splitlines()) if path.exists() else []
        return docs, sorted(errors)

    [one], one_errors = read(1)
    shared, errors = read(3)
    assert sorted(sum(shared, [])) == sorted(one) and errors == one_errors  # each record and error once, named as before
    assert len([e for e in errors if '"unreadable_file"' in e]) == 1 and len(errors) == 4
    runs = {"notes/notes.jsonl": [(1, 3), (4, 6), (7, 10)], "table/notes.parquet": [(1, 2), (3, 4), (5, 7)],
            "export/export.csv": [(1, 1), (2, 3), (4, 5)]}  # in rows of the CSV, not its lines
    for rank, ids in enumerate(shared):  # every task has its third of the notes and of the table's rows, in order
        for name, parts in runs.items():
            first, last = parts[rank]
            bad = {".jsonl": (5, 8), ".csv": (3,)}.get(Path(name).suffix, ())  # quarantined
            assert [i for i in ids if i.startswith(name)] == [f"{name}:{n}" for n in range(first, last + 1) if n not in bad]
    assert [[i for i in ids if i.startswith("web/")] for ids in shared] == [  # whole files, one task each
        ["web/web0.jsonl:1", "web/web3.jsonl:1"], ["web/web1.jsonl:1"], ["web/web2.jsonl:1"]]


def test_csv_notes_are_read_across_lines_and_their_bad_rows_quarantined(tmp_path):
    """EHR exports come as CSV (MIMIC's notes: csv.gz, each note across lines in one quoted field): every row a
    record keyed by the header, numbered in rows after the header. A row with another number of fields, bytes that
    are not UTF-8, an empty or too long text is quarantined with its file and row, and reading goes on; a .tsv is
    tab-separated; a break of the CSV syntax ends the file there, named, with the rows before it kept."""
    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader

    note = 'Seen for "thunderclap" headache,\nworse on lying down.\n\nPlan: MRI, LP.'
    rows = ["\ufeffnote_id,subject_id,text", "N1,7," + '"' + note.replace('"', '""') + '"', "", "N2,8,too,many",
            "N3,9,caf\udce9 au lait", "N4,9,", "N5,9," + "x" * 101, ",10,Unnamed note on gait.", "N7,11,Last note."]
    (tmp_path / "notes.csv.gz").write_bytes(gzip.compress("\r\n".join(rows).encode("utf-8", "surrogateescape")))
    (tmp_path / "radiology.tsv").write_text("id\ttext\nR1\tMRI brain, no acute findings.\n")
    (tmp_path / "broken.csv").write_text('text\nKept note.\n"Stray" quote\nNever read.\n')
    ehr = SourceConfig("ehr", [], 1.0, format="csv", id_key="note_id")
    files = [(ehr, str(tmp_path / name)) for name in ("notes.csv.gz", "radiology.tsv", "broken.csv")]
    docs = list(MixReader(files, str(tmp_path / "errors"), max_doc_chars=100).run())
    assert [(d.id, d.metadata["line"]) for d in docs] == [
        ("ehr/N1", 1), ("ehr/notes.csv.gz:6", 6), ("ehr/N7", 7), ("ehr/radiology.tsv:1", 1), ("ehr/broken.csv:1", 1)]
    assert docs[0].text == 'Seen for "thunderclap" headache,\nworse on lying down.\n\nPlan: MRI, LP.'
    assert docs[3].text == "MRI brain, no acute findings."
    errors = [json.loads(x) for x in (tmp_path / "errors" / "read_00000.jsonl").read_text().splitlines()]
    assert [(Path(e["file"]).name, e["line"], e["reason"]) for e in errors] == [
        ("notes.csv.gz", 2, "malformed_csv"), ("notes.csv.gz", 3, "non_utf8"), ("notes.csv.gz", 4, "empty"),
        ("notes.csv.gz", 5, "too_large"), ("broken.csv", 2, "malformed_csv")]
    assert errors[0]["excerpt"].startswith("4 fields where the header has 3 (line 7): N2,8,too,many")
    assert errors[1]["excerpt"] == "column 'text', character 3 (line 8)"
    assert errors[4]["excerpt"] == ("',' expected after '\"' at line 3: not read past it, since the end of this "
                                    "record is unknown")


def test_plain_text_files_are_a_document_each_named_by_their_path(tmp_path):
    """A note per .txt file (as many clinical exports and corpora come): each file one document, named by its path
    below the source's folder without the suffix; a file that is not UTF-8, empty, or of more than 4 bytes per
    max_doc_chars (not read) is quarantined with its file."""
    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader

    (tmp_path / "notes" / "2024").mkdir(parents=True)
    (tmp_path / "notes" / "2024" / "n1.txt").write_text("HPI: new tremor.\n\nPLAN: DaT scan.\n")
    (tmp_path / "notes" / "n2.txt").write_text("Gait steady; Romberg negative.")
    (tmp_path / "notes" / "latin1.txt").write_bytes("Caf\xe9 au lait spots.".encode("latin-1"))
    (tmp_path / "notes" / "blank.txt").write_text("  \n")
    (tmp_path / "notes" / "huge.txt").write_text("x" * 401)
    notes = SourceConfig("notes", [], 1.0, format="text")
    files = [(notes, str(p)) for p in sorted((tmp_path / "notes").rglob("*.txt"))]
    docs = list(MixReader(files, str(tmp_path / "errors"), max_doc_chars=100).run())
    assert [(d.id, d.text) for d in docs] == [("notes/2024/n1", "HPI: new tremor.\n\nPLAN: DaT scan."),
                                              ("notes/n2", "Gait steady; Romberg negative.")]
    errors = [json.loads(x) for x in (tmp_path / "errors" / "read_00000.jsonl").read_text().splitlines()]
    assert sorted((Path(e["file"]).name, e["reason"], e["excerpt"]) for e in errors) == [
        ("blank.txt", "empty", ""), ("huge.txt", "too_large", "file of 401 bytes, over 4 bytes per max_doc_chars: not read"),
        ("latin1.txt", "non_utf8", "byte 3")]


def test_a_csv_source_without_its_text_column_stops_the_build_naming_the_header(tmp_path):
    """A wrong ``text_key`` would quarantine every row of a csv file: the build stops before any work instead,
    naming the file and its columns (a guarded file without a header row: its first note's fields redacted, as
    the message goes to the console and the log); with the column named, the notes go through the PHI guard to
    the binaries."""
    import csv
    import random

    from preprocessing.demo_corpus import clinical_note

    rng = random.Random(0)
    notes = [clinical_note(rng, i, with_phi=True) for i in range(6)]  # identifiers on their own lines
    with open(tmp_path / "notes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["NOTE_ID", "TEXT"]] + [[f"N{i}", note] for i, note in enumerate(notes)])
    raw = _templated_notes(tmp_path)
    raw["sources"] = [{"name": "ehr", "paths": ["notes.csv"], "format": "csv", "share": 1.0, "phi_guard": True,
                       "filters": {"min_chars": 50, "gopher_quality": None, "gopher_repetition": None}}]
    with pytest.raises(BuildError, match=r"source ehr: .*notes\.csv has no column 'text' \(its header: NOTE_ID, "
                                         r"TEXT\): set the source's text_key, or add a header row naming the columns"):
        build_mix.build(MixRecipe(**raw))
    with open(tmp_path / "headerless.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Jonathan Whitfield", "MRN 4417702", "(617) 555-0142", notes[0]]])
    with pytest.raises(BuildError, match=r"headerless\.csv has no column 'text' \(its header: \[NAME\], MRN \[MRN\], "
                                         r"\[PHONE\], Patient: \[NAME\]  MRN: \[MRN\]  DOB: \[DATE\]\): set") as stopped:
        build_mix.build(MixRecipe(**{**raw, "sources": [{**raw["sources"][0], "paths": ["headerless.csv"]}]}))
    assert not re.search(r"Whitfield|4417702|555-0142", str(stopped.value))
    raw["sources"][0].update(text_key="TEXT", id_key="NOTE_ID")
    recipe = MixRecipe(**raw)
    mix = build_mix.build(recipe)
    training = "\n".join(_decoded(recipe, "ehr"))
    assert mix["sources"]["ehr"]["documents"] >= 6 and training.count("CHIEFCOMPLAINT") == 6
    planted = {v for m in DEMO_PHI.finditer("\n".join(notes)) for v in m.groups() if v}
    assert len(planted) == 6 * 8 and not [p for p in planted if _squash(p) in training]


def test_select_keeps_the_chosen_records_before_the_guard_and_counts_the_rest(tmp_path):
    """``select`` keeps the records whose fields hold the chosen values (MIMIC-III's NOTEEVENTS: the note categories
    wanted, ISERROR empty), at read, before the PHI guard spends time on them: the others are counted as dropped by
    the field that excluded them, in the ledger and the report, and a recipe's bad select stops its load."""
    import csv
    import random

    from preprocessing.demo_corpus import clinical_note
    from preprocessing.recipe import SourceConfig
    from preprocessing.report import collect_ledger

    rng = random.Random(1)
    rows = [("Discharge summary", ""), ("Nursing", ""), ("Radiology", ""), ("Discharge summary", "1"),
            ("Discharge summary", ""), ("ECG", "1")]
    with open(tmp_path / "NOTEEVENTS.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ROW_ID", "CATEGORY", "ISERROR", "TEXT"]] + [
            [i, category, error, f"NOTE {i}.\n" + clinical_note(rng, i, with_phi=True)] for i, (category, error) in enumerate(rows)])
    raw = _templated_notes(tmp_path)
    raw["sources"] = [{"name": "ehr", "paths": ["NOTEEVENTS.csv"], "format": "csv", "text_key": "TEXT", "id_key": "ROW_ID",
                       "share": 1.0, "phi_guard": True, "select": {"CATEGORY": ["Discharge summary", "Radiology"],
                                                                   "ISERROR": [""]},
                       "filters": {"min_chars": 50, "gopher_quality": None, "gopher_repetition": None}}]
    recipe = MixRecipe(**raw)
    build_mix.build(recipe)
    kept = "".join(_decoded(recipe, "ehr"))
    assert [i for i in range(6) if f"NOTE{i}." in kept] == [0, 2, 4]
    entry = collect_ledger(tmp_path / "out" / "logs", ["ehr"])["ehr"]
    assert entry["read"] == 6 and entry["dropped"] == {"select:CATEGORY": 2, "select:ISERROR": 1} and balance(entry) == 0
    assert entry["phi"]["name"] == 3  # the guard ran on the three kept notes only
    assert "| ehr | selection | dropped | select:CATEGORY | 2 |" in (tmp_path / "out" / "report.md").read_text()
    for bad, message in (({"format": "latex", "select": {"a": ["b"]}}, "a latex file is only text"),
                         ({"select": {"CATEGORY": "Radiology"}}, "select.CATEGORY must be a list of the values to keep")):
        with pytest.raises(ValueError, match=message):
            SourceConfig("ehr", [], 1.0, **bad)


def test_select_takes_text_only_and_compares_json_values_as_json_writes_them(tmp_path):
    """YAML reads unquoted 1.0, 007, no and null as a float, an octal int, a boolean and None, whose text is not the
    data's: such a select would keep nothing, silently, so the recipe's load refuses it, naming the source, the field
    and the value. A JSON record's boolean compares as JSON writes it ("false"), a number as its text."""
    import yaml

    from preprocessing.steps import _unselected

    raw = _templated_notes(tmp_path)
    for written, shown in (("1.0", "1.0 (float)"), ("007", "7 (int)"), ("no", "False (bool)"), ("null", "None (NoneType)")):
        source = {"name": "ehr", "paths": ["*.jsonl"], "share": 1.0, "select": {"ISERROR": ["", written]}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**raw, "sources": [source]}).replace(f"'{written}'", written))
        with pytest.raises(ValueError, match=re.escape(f"source ehr: select.ISERROR holds {shown}, not text")):
            MixRecipe.load(tmp_path / "r.yaml")
    kept = {"error": {"false"}, "visits": {"3"}, "code": {""}}
    assert _unselected({"error": False, "visits": 3}, kept) is None  # a missing code reads as ""
    assert _unselected({"error": True, "visits": 3}, kept) == "error"
    assert _unselected({"error": False, "visits": 3.0}, kept) == "visits"  # 3.0 is written "3.0"
    assert _unselected({"error": False, "visits": 3, "code": None}, kept) is None


def test_the_reference_mix_recipe_builds_its_corpora_in_their_formats_for_the_cpt_config(tmp_path):
    """launch/configs/neuro_mix.yaml, the flagship's mix: the published shares, the CPT config's seq_length and the
    mix path it reads, and a build of the recipe as shipped (paths, formats, filters) on the demo corpus laid out as
    its paths expect: the EHR notes as a MIMIC-style csv.gz (note_id, text), the papers a folder each; only the
    scale (seq_length, token_budget) overridden, and the synthetic papers' repetition filter (as the demo's)."""
    import csv

    from megatron_ext.train_config import TrainConfig

    launch = Path(__file__).resolve().parents[1] / "launch" / "configs"
    root = tmp_path / "project"
    (root / "launch" / "configs").mkdir(parents=True)
    shutil.copy(launch / "neuro_mix.yaml", root / "launch" / "configs")
    corpora = root / "corpora"
    for folder in ("ehr", "pubmed", "medical", "english"):
        (corpora / folder).mkdir(parents=True)
    notes = [json.loads(x) for x in (DEMO / "ehr" / "notes_0.jsonl").read_text().splitlines()]
    with gzip.open(corpora / "ehr" / "discharge.csv.gz", "wt", newline="") as f:
        csv.writer(f).writerows([["note_id", "subject_id", "text"]] + [[n["id"], 1000 + i, n["text"]]
                                                                       for i, n in enumerate(notes)])
    for tex in sorted((DEMO / "arxiv").glob("*.tex")):
        (corpora / "arxiv" / tex.stem).mkdir(parents=True)
        shutil.copy(tex, corpora / "arxiv" / tex.stem / "main.tex")
    shutil.copy(DEMO / "pubmed" / "abstracts.jsonl.gz", corpora / "pubmed")
    shutil.copy(DEMO / "med" / "general_medical.parquet", corpora / "medical")
    (corpora / "english" / "web.jsonl.gz").write_bytes(gzip.compress((DEMO / "en" / "web.jsonl").read_bytes()))
    (root / "benchmarks" / "medqa").mkdir(parents=True)
    shutil.copy(DEMO / "benchmarks" / "medqa_sample.jsonl", root / "benchmarks" / "medqa" / "test.jsonl")
    shutil.copytree(DEMO / "tokenizer", root / "Qwen3.5-2B-Base")

    shipped = MixRecipe.load(root / "launch" / "configs" / "neuro_mix.yaml")
    assert {s.name: s.share for s in shipped.sources} == {"ehr": 0.45, "arxiv_neuro": 0.25, "pubmed_neuro": 0.15,
                                                          "general_medical": 0.12, "english": 0.03}
    cpt = TrainConfig.load(launch / "neuro_cpt_2b.yaml")
    assert shipped.seq_length == cpt.seq_length and shipped.out / "mix.json" == root / cpt.mix
    assert shipped.token_budget // (cpt.global_batch_size * cpt.seq_length) == 572  # the CPT config's comment
    recipe = MixRecipe.load(root / "launch" / "configs" / "neuro_mix.yaml", seq_length=512, token_budget=150_000)
    demo = MixRecipe.load(DEMO / "recipe.yaml")
    recipe.sources[1].filters = demo.sources[1].filters  # the synthetic papers reuse sentence templates (see there)
    mix = build_mix.build(recipe)
    assert set(mix["sources"]) == {s.name for s in shipped.sources}
    assert all(mix["sources"][s]["documents"] > 0 for s in mix["sources"]), mix["sources"]
    # every note of the csv.gz passes the flagship's filters, once (the held-out ones in heldout/), its PHI redacted
    notes_out = "".join(_decoded(recipe, "ehr")) + _squash((recipe.out / mix["sources"]["ehr"]["heldout"]).read_text())
    assert len(notes) == notes_out.count("CHIEFCOMPLAINT") == 130
    planted = {v for m in DEMO_PHI.finditer("\n".join(n["text"] for n in notes)) for v in m.groups() if v}
    assert len(planted) > 100 and not [p for p in planted if _squash(p) in notes_out]


def test_the_clean_stage_says_how_far_each_task_has_read(tmp_path, monkeypatch, caplog):
    """The clean stage runs for hours on a large corpus, and datatrove logs nothing to the console until a task ends:
    each task says every few minutes what it has read, how fast, and how many of its files are done."""
    from preprocessing import steps
    from preprocessing.recipe import SourceConfig

    web = SourceConfig("web", [], 1.0)
    for k in range(2):
        (tmp_path / f"web{k}.jsonl").write_text("".join(json.dumps({"text": "A page. " * 100}) + "\n" for _ in range(3)))
    files = [(web, str(tmp_path / f"web{k}.jsonl")) for k in range(2)]
    monkeypatch.setattr(steps.Progress, "every", 0.0)
    with caplog.at_level("INFO", logger="preprocessing.steps"):
        assert len(list(steps.MixReader(files, str(tmp_path / "errors"), 10_000).run())) == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "preprocessing.steps"]
    assert len(lines) == 6 and lines[0].startswith("clean, task 1/1: 1 documents, 0.0 MB of text in ")
    assert lines[-1].startswith("clean, task 1/1: 6 documents") and "files done: 1 of 2" in lines[-1]


EXAM = "Mental status: alert and oriented.\nCranial nerves: intact.\nMotor: strength 5/5 throughout.\n"
COMPLAINTS = ["headache", "dizziness", "numbness", "tremor", "seizure", "neck pain"]


def _templated_notes(tmp: Path, sources: list[dict] = (), **overrides) -> dict:
    """Templated clinical notes (a few lines repeated in every note), which fall to datatrove's default Gopher
    repetition thresholds, as the first source of a recipe's fields."""
    notes = [{"id": f"n{i}", "text": f"Patient {i} was seen in clinic for {COMPLAINTS[i % 6]} lasting {i + 2} days.\n" + EXAM * 3}
             for i in range(12)]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes))
    notes_source = {"name": "notes", "paths": ["notes.jsonl"], "share": 1 - sum(s["share"] for s in sources),
                    "filters": {"min_chars": 50, "gopher_quality": None}}
    return dict(tokenizer=str(DEMO / "tokenizer"), output_dir=str(tmp / "out"), seq_length=128, heldout_fraction=0.0,
                base_dir=str(tmp), sources=[notes_source, *sources], **overrides)


NOTES_GONE = (r"no document survived stage clean: source notes: 12 read, removed by quality filters "
              r"\(gopher_repetition:dup_line_frac: 12\)\. Counts in .*report\.md; relax the recipe and rerun with --clean")


def test_a_source_losing_every_document_gets_a_report_and_the_filter_named(tmp_path):
    """The build stops after the stage that emptied the source (not hours of dedup later), with the per-stage report."""
    out = tmp_path / "out"
    raw = _templated_notes(tmp_path, [{"name": "english", "paths": [str(DEMO / "en" / "*.jsonl")], "share": 0.5}])
    with pytest.raises(NoDocuments, match=NOTES_GONE):
        build_mix.build(MixRecipe(**raw))
    report = (out / "report.md").read_text()
    assert "| notes | 12 | 0 | 12 | 0 | 0 | 0 | 0.0 | 0 |" in report  # per-stage counts, all accounted for
    assert "| notes | quality filters | dropped | gopher_repetition:dup_line_frac | 12 |" in report
    assert "No document of notes survived stage clean" in report and "| english |" in report
    assert (out / "report_documents.png").is_file() and not (out / "mix.json").exists()
    assert not (out / "logs" / "exact_signatures").exists()  # stopped before the next stage
    assert (out / "work").is_dir()  # a failed build keeps its work


def test_every_document_filtered_out_stops_with_the_filter_named_and_a_relaxed_rerun_builds(tmp_path):
    """One source, all of it filtered in the first stage: no document reaches dedup, which would find no input."""
    raw = _templated_notes(tmp_path)
    with pytest.raises(NoDocuments, match=NOTES_GONE):
        build_mix.build(MixRecipe(**raw))
    assert "No document of notes survived stage clean" in (tmp_path / "out" / "report.md").read_text()
    raw["sources"][0]["filters"]["gopher_repetition"] = None  # relaxed, as the error advises
    with pytest.raises(BuildError, match=r"\(sources changed\); rerun with --clean"):
        build_mix.build(MixRecipe(**raw))
    shutil.rmtree(tmp_path / "out")  # --clean
    assert build_mix.build(MixRecipe(**raw))["sources"]["notes"]["documents"] > 0


def _cli(recipe: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing.build_mix", "--config", str(recipe), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(run: subprocess.CompletedProcess, log: Path, pattern: str) -> None:
    """The command failed with one line naming the problem on the console, its traceback only in the log file."""
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.search(pattern, run.stderr.strip().splitlines()[-1]), run.stderr[-3000:]
    assert "Traceback" in log.read_text() and re.search(pattern, log.read_text())


def test_slurm_stops_the_job_chain_and_the_rerun_names_the_filter(tmp_path):
    """On Slurm the stages are chained jobs: the job after the emptying stage stops with the build's message
    (not datatrove's 'No files found') and the jobs after it never start; the rerun reports and stops."""
    fake = Path(__file__).parent / "fake_slurm"
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_templated_notes(tmp_path)))
    submitted = _cli(recipe, "--executor", "slurm", env=env)
    assert submitted.returncode == 0 and "cluster jobs submitted" in submitted.stdout, submitted.stderr[-3000:]
    logs = tmp_path / "out" / "logs"
    task_log = (logs / "exact_signatures" / "logs" / "task_00000.log").read_text()
    assert re.search(NOTES_GONE, task_log) and "No files found" not in task_log
    assert not (logs / "exact_find" / "logs").exists()  # its dependency failed: never ran
    stopped = _cli(recipe, "--executor", "slurm", env=env)
    _one_line_error(stopped, tmp_path / "out" / "build_mix.log", "error: " + NOTES_GONE)
    assert "No document of notes survived stage clean" in (tmp_path / "out" / "report.md").read_text()


def test_input_errors_end_the_command_with_one_line(tmp_path):
    raw = _templated_notes(tmp_path)
    recipe, log = tmp_path / "recipe.yaml", tmp_path / "out" / "build_mix.log"
    recipe.write_text(yaml.safe_dump({**raw, "sources": [{**raw["sources"][0], "paths": ["missing/*.jsonl"]}]}))
    _one_line_error(_cli(recipe), log, r"error: source notes: no files match \['missing/\*\.jsonl'\]")
    recipe.write_text(yaml.safe_dump(raw))  # fixed: a build that stopped before it started recorded no recipe
    _one_line_error(_cli(recipe), log, "error: " + NOTES_GONE)
    recipe.write_text(yaml.safe_dump({**raw, "seed": raw.get("seed", 0) + 1}))
    _one_line_error(_cli(recipe), log, r"\(seed changed\); rerun with --clean")
    _one_line_error(_cli(recipe, "--clean"), log, "error: " + NOTES_GONE)
    recipe.write_text(yaml.safe_dump({**raw, "seq_lenght": 64}))
    bad = _cli(recipe)
    assert bad.returncode == 1 and bad.stderr.strip() == f"{recipe}: unknown recipe keys ['seq_lenght']"
    # in a source: named with the source, not as SourceConfig's TypeError
    recipe.write_text(yaml.safe_dump({**raw, "sources": [{**raw["sources"][0], "phi_gaurd": True}]}))
    bad = _cli(recipe)
    assert bad.returncode == 1 and bad.stderr.strip() == f"{recipe}: source notes: unknown keys ['phi_gaurd']"
    recipe.write_text(yaml.safe_dump({**raw, "sources": [{k: v for k, v in raw["sources"][0].items() if k != "share"}]}))
    bad = _cli(recipe)
    assert bad.returncode == 1 and bad.stderr.strip() == f"{recipe}: source notes: missing keys ['share']"


def test_a_second_build_into_a_held_folder_stops_at_once_and_a_gone_holder_holds_nothing(tmp_path):
    """A build still running (enrich_data or build_mix: one folder) holds its output folder: a second one, --clean
    included, stops with one line naming the first and touches nothing. The hold dies with its process, killed
    included, and a worker it forked does not keep it."""
    from preprocessing.atomic import DirectoryInUse, hold_directory

    recipe, out = _recipe(tmp_path), tmp_path / "mix"
    holder = hold_in_another_process(out)
    (out / "notes.txt").write_text("the first build's")
    for cli in ([sys.executable, "-m", "preprocessing.build_mix", "--config", str(recipe), "--clean"],
                [sys.executable, "-m", "preprocessing.build_sft", "--config", str(DEMO / "sft_recipe.yaml"),
                 "--output-dir", str(out)]):
        run = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert re.fullmatch(rf"error: {re.escape(str(out))} is in use by another build \(pid {holder.pid} on \S+ since "
                            r"[\d: -]+\); two at once would .*", run.stderr.strip().splitlines()[-1]), run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    with pytest.raises(DirectoryInUse, match=f"pid {holder.pid}"), hold_directory(out, "build"):
        pass
    holder.kill()
    holder.wait()
    code = ("import os, sys, time\nfrom preprocessing.atomic import hold_directory\n"
            "with hold_directory(sys.argv[1], 'build'):\n    worker = os.fork()\n    if worker == 0:\n"
            "        os.closerange(0, 3)\n        time.sleep(600)\n    print(worker)\n")
    worker = int(subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True,
                                timeout=60).stdout)
    try:
        with hold_directory(out, "build"):  # the killed holder, and the worker still asleep, hold nothing
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_folder_on_a_filesystem_without_locks_is_used_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some cluster filesystems refuse locks (Lustre mounted without flock: ENOLCK, EOPNOTSUPP): the job runs, and
    says that a second one into its folder would not be stopped."""
    import errno
    import fcntl

    from preprocessing.atomic import hold_directory

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with caplog.at_level("WARNING", logger="preprocessing.atomic"), hold_directory(tmp_path / "out", "build"):
        ran = True
    assert ran and "cannot be locked" in caplog.text and "would not be stopped" in caplog.text


def test_a_chunk_overlap_as_long_as_a_chunk_stops_before_any_stage(tmp_path):
    """Only the last stage chunks: a recipe it cannot follow must stop when loaded, not after the dedup."""
    raw = yaml.safe_load(_recipe(tmp_path).read_text())
    ehr = raw["sources"][0]
    for overlap in (511, -1):
        raw["sources"][0] = {**ehr, "chunk_overlap": overlap}
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        run = _cli(recipe)
        assert run.returncode == 1 and run.stderr.strip() == (
            f"{recipe}: source ehr: chunk_overlap {overlap} must be in [0, 511) (a chunk holds seq_length 512 - 1 tokens and EOS)")
        assert not (tmp_path / "mix").exists()
    raw["sources"][0] = {**ehr, "chunk_overlap": 510}  # the largest that leaves a chunk one new token
    assert MixRecipe(**raw).sources[0].chunk_overlap == 510


def test_a_report_rewrite_that_fails_keeps_the_last_whole_report(tmp_path, monkeypatch):
    """A disk that fills while report.md is rewritten must not leave half a report for the user to trust."""
    from preprocessing.report import collect_ledger, write_report

    recipe = MixRecipe.load(_recipe(tmp_path))
    (recipe.out / "logs").mkdir(parents=True)
    (recipe.out / "report.md").write_text("# Mix report of the last run\n")
    write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_report(recipe, collect_ledger(recipe.out / "logs", [s.name for s in recipe.sources]), None, recipe.out)
    assert sorted(p.name for p in recipe.out.iterdir()) == ["logs", "report.md"]
    assert (recipe.out / "report.md").read_text() == "# Mix report of the last run\n"


def test_merged_tokens_that_differ_from_the_counts_stop_the_build(tmp_path):
    """A stray per-rank part (here a copy of one) would put tokens in the mix that mix.json and the report do not count."""
    from preprocessing.pipeline import run_stages

    recipe = MixRecipe.load(_recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 1.0}]))
    assert run_stages(recipe)
    parts = recipe.out / "work" / "tokens" / "english"
    for ext in ("bin", "idx"):
        shutil.copy(parts / f"00000.{ext}", parts / f"00001.{ext}")
    with pytest.raises(BuildError, match=r"english_text_document\.bin: merging 2 parts gives (\d+) documents and (\d+) tokens, "
                                         r"the stages counted \d+ and \d+; rebuild with --clean"):
        build_mix.build(recipe)
    assert not (recipe.out / "mix.json").exists() and not list(recipe.out.glob("*english_text_document*"))


def test_resume_after_kill_gives_identical_outputs(tmp_path):
    def run(tag: str, kill_after: str | None = None):
        cmd = [sys.executable, "-m", "preprocessing.build_mix", "--config", str(_recipe(tmp_path / tag))]
        if kill_after is None:
            return subprocess.run(cmd, check=True, capture_output=True, text=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        marker = tmp_path / tag / "mix" / "logs" / kill_after / "completions"
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its worker processes, like an OOM kill of the job
        proc.wait()
        assert not (tmp_path / tag / "mix" / "mix.json").exists()  # it really died mid-way
        subprocess.run(cmd, check=True, capture_output=True)  # the same command resumes

    quiet = run("a")
    # the console has the stage lines, not datatrove's pipeline and stats tables: those are in the log file
    log = (tmp_path / "a" / "mix" / "build_mix.log").read_text()
    assert "stage clean: 1 tasks" in quiet.stderr and "📉" not in quiet.stderr and "📉" in log and "PIPELINE" in log
    assert quiet.stderr.count("\n") <= 25, quiet.stderr  # stage lines and a few dedup progress bars
    run("b", kill_after="exact_filter")
    a, b = tmp_path / "a" / "mix", tmp_path / "b" / "mix"
    names = sorted(p.name for p in a.glob("*_text_document.*")) + ["mix.json"]
    for name in names:
        expected = (a / name).read_bytes().replace(str(a).encode(), b"")
        assert (b / name).read_bytes().replace(str(b).encode(), b"") == expected, name
    for f in (a / "heldout").iterdir():
        assert (b / "heldout" / f.name).read_text() == f.read_text()


def test_phi_drop_policy_and_token_dtype():
    from datatrove.data import Document

    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import PHIGuard
    from preprocessing.tokenizer import token_dtype

    guard = PHIGuard([SourceConfig(name="ehr", paths=[], share=1.0, phi_guard=True, phi_policy="drop")])
    docs = [Document(text="Call 555-123-4567 tomorrow.", id="a", metadata={"source": "ehr"}),
            Document(text="No identifiers here.", id="b", metadata={"source": "ehr"})]
    assert [d.id for d in guard.run(iter(docs))] == ["b"]
    assert guard.stats["dropped/ehr/phi"].total == 1 and guard.stats["phi/ehr/phone"].total == 1
    assert token_dtype(248320) == np.int32 and token_dtype(2048) == np.uint16


def _assert_same_mix(built: tuple[MixRecipe, dict], other: tuple[MixRecipe, dict]) -> None:
    """The same mix, however the work was split: per source the same counts, the same training documents and
    the same held-out documents (each worker writes its own part, merged after), in any order."""
    (recipe, mix), (recipe_b, mix_b) = built, other
    assert mix_b["sources"].keys() == mix["sources"].keys()
    for source, entry in mix["sources"].items():
        entry_b = mix_b["sources"][source]
        assert (entry_b["tokens"], entry_b["documents"]) == (entry["tokens"], entry["documents"]), source
        assert sorted(_decoded(recipe_b, source)) == sorted(_decoded(recipe, source)), source
        held, held_b = (sorted((r.out / e["heldout"]).read_text().splitlines())
                        for r, e in ((recipe, entry), (recipe_b, entry_b)))
        assert held and held_b == held, source
    # and the same accounting: documents read, quarantined and dropped per reason (a document read by two workers is
    # dropped again as an exact duplicate, leaving the same mix under a report that counts it twice)
    from preprocessing.report import collect_ledger

    ledgers = [collect_ledger(r.out / "logs", list(mix["sources"])) for r in (recipe, recipe_b)]
    assert ledgers[1] == ledgers[0]


def _built(recipe_path: Path) -> tuple[MixRecipe, dict]:
    recipe = MixRecipe.load(recipe_path)
    return recipe, json.loads((recipe.out / "mix.json").read_text())


def test_two_workers_give_the_same_mix_as_one(demo_mix, tmp_path):
    recipe_two = MixRecipe.load(_recipe(tmp_path))
    _assert_same_mix(demo_mix, (recipe_two, build_mix.build(recipe_two, workers=2)))


def test_ray_executor_gives_the_same_mix(demo_mix, tmp_path):
    """datatrove's Ray executor on a local Ray cluster (the Slurm one needs a Slurm controller)."""
    # in a process of its own, as a user runs it: Ray left its SIGTERM handling in the test process, and twice a
    # datatrove worker pool forked later in that process (test_sft's build) outlived the SIGTERM of its shutdown
    ray_recipe = _recipe(tmp_path)
    run = _cli(ray_recipe, "--executor", "ray", "--workers", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_mix(demo_mix, _built(ray_recipe))


def test_latex_becomes_prose():
    from preprocessing.steps import latex_to_text

    text = latex_to_text(r"""\documentclass{article}\title{Cortical dynamics}\author{A. B.}\begin{document}\maketitle
\section{Intro} Rates follow $\tau \dot r = -r$ \cite{ref1}, see Fig.~\ref{fig:1}.
\begin{figure}\caption{hidden}\end{figure}
\begin{thebibliography}{9}\bibitem{ref1} Someone.\end{thebibliography}\end{document}""")
    assert "Cortical dynamics" in text and "Rates follow" in text and "τ" in text
    for leftover in ("\\", "cite", "ref1", "Someone", "hidden", "A. B.", "NO \\author", "<cit.>"):
        assert leftover not in text, leftover


def test_records_without_an_id_are_named_by_their_path_below_the_source_folder(tmp_path):
    """A document without an id is named by its file (and line): by the file's name alone, every paper of the usual
    one-folder-per-paper arXiv layout was 'main', so the held-out split took all of them or none."""
    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader

    for paper in ("2101.00001", "2101.00002"):
        (tmp_path / "arxiv" / paper).mkdir(parents=True)
        (tmp_path / "arxiv" / paper / "main.tex").write_text(r"\begin{document}A study of " + paper + r"\end{document}")
    for year in ("2019", "2020"):
        (tmp_path / "ehr" / year).mkdir(parents=True)
        (tmp_path / "ehr" / year / "notes.jsonl").write_text('{"text": "Seen today."}\n{"text": "Seen again."}\n')
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "web.jsonl").write_text('{"text": "A page."}\n')
    sources = [SourceConfig(name="arxiv", paths=[], share=0.4, format="latex"),
               SourceConfig(name="ehr", paths=[], share=0.4), SourceConfig(name="web", paths=[], share=0.2)]
    files = [(sources[0], str(p)) for p in sorted((tmp_path / "arxiv").glob("*/main.tex"))]
    files += [(sources[1], str(p)) for p in sorted((tmp_path / "ehr").glob("*/notes.jsonl"))]
    files += [(sources[2], str(tmp_path / "flat" / "web.jsonl"))]
    ids = [doc.id for doc in MixReader(files, str(tmp_path / "errors"), 10_000).run()]
    assert ids == ["arxiv/2101.00001/main", "arxiv/2101.00002/main", "ehr/2019/notes.jsonl:1", "ehr/2019/notes.jsonl:2",
                   "ehr/2020/notes.jsonl:1", "ehr/2020/notes.jsonl:2", "web/web.jsonl:1"]  # flat: as before


def test_mix_warns_when_a_source_needs_many_epochs(caplog, tmp_path):
    recipe = MixRecipe(tokenizer=str(DEMO / "tokenizer"), output_dir=str(tmp_path), token_budget=1000,
                       sources=[{"name": "a", "paths": [], "share": 0.5}, {"name": "b", "paths": [], "share": 0.5}])
    ledger = {"a": {"tokens": 100, "chunks": 1}, "b": {"tokens": 1000, "chunks": 1}}
    mix = build_mix.mix_json(recipe, {"a": "a_text_document", "b": "b_text_document"}, {"a": "h/a", "b": "h/b"}, ledger)
    assert mix["sources"]["a"]["epochs"] == 5.0 and mix["sources"]["b"]["epochs"] == 0.5
    assert mix["data_path"] == [0.5, "a_text_document", 0.5, "b_text_document"]
    assert "source a: 5.0 epochs" in caplog.text and "source b" not in caplog.text


def test_slurm_executor_wiring(demo_mix, tmp_path):
    """The Slurm path (stage job arrays chained by dependencies; rerun to merge and report) with stand-ins
    for sbatch/srun that run each array task on this machine, since no Slurm controller is available."""
    fake = Path(__file__).parent / "fake_slurm"
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "preprocessing.build_mix", "--config", str(_recipe(tmp_path)),
           "--executor", "slurm", "--partition", "demo"]
    submitted = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "cluster jobs submitted" in submitted.stdout and not (tmp_path / "mix" / "mix.json").exists()
    assert len(json.loads((tmp_path / "mix" / "logs" / "slurm_jobs.json").read_text())) == 8  # one job per stage
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True)  # after the jobs: merge + report
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not (tmp_path / "mix" / "logs" / "slurm_jobs.json").exists()  # a later rerun asks Slurm nothing
    _assert_same_mix(demo_mix, _built(tmp_path / "recipe.yaml"))


def test_a_slurm_rerun_while_its_jobs_are_queued_stops_instead_of_submitting_them_again(tmp_path):
    """The submitting command ends at once, its hold on the folder with it: a rerun before the jobs end (to see whether
    they have) submitted the unfinished stages again, a second chain writing the same files as the first."""
    fake = tmp_path / "bin"
    fake.mkdir()
    jobs = tmp_path / "jobs"
    (fake / "sbatch").write_text(f'#!/usr/bin/env bash\necho $(( $(cat {jobs} 2>/dev/null | wc -l) + 7000 )) >> {jobs}\n'
                                 f'echo "Submitted batch job $(tail -1 {jobs})"\n')  # queued; a busy cluster
    (fake / "squeue").write_text(f"#!/usr/bin/env bash\n[[ -f {tmp_path / 'finished'} ]] && reason=DependencyNeverSatisfied "
                                 f"|| reason=Priority\nsed \"s/$/_[0] $reason/\" {jobs}\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "preprocessing.build_mix", "--executor", "slurm", "--partition", "demo", "--config",
           str(_recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 1.0}]))]
    submitted = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0 and "cluster jobs submitted" in submitted.stdout, submitted.stderr[-3000:]
    first = jobs.read_text().split()
    early = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert early.returncode == 1 and jobs.read_text().split() == first, early.stderr[-3000:]  # nothing submitted again
    assert re.fullmatch(rf"error: {re.escape(str(tmp_path / 'mix'))}: its Slurm jobs 7000, [\d, ]+ \(submitted by the last run\) "
                        r"are still queued or running; rerun the same command when they have finished \(or scancel them "
                        r"first\)", early.stderr.strip().splitlines()[-1]), early.stderr[-3000:]
    clean = subprocess.run(cmd + ["--clean"], env=env, capture_output=True, text=True)  # nor under their feet
    assert clean.returncode == 1 and "are still queued or running" in clean.stderr.strip().splitlines()[-1], clean.stderr
    assert (tmp_path / "mix" / "recipe.resolved.json").exists()
    # they wait for ever on a job that failed (where Slurm does not cancel them): they will not run, so the stages
    # are submitted again
    (tmp_path / "finished").touch()
    later = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert later.returncode == 0 and len(jobs.read_text().split()) == 2 * len(first), later.stderr[-3000:]


def test_a_rerun_after_a_kill_while_work_is_removed_keeps_the_mix(tmp_path, monkeypatch):
    """Removing work/ (hundreds of GB on a cluster) can be killed half-way; the rerun must not merge what is left."""
    recipe = MixRecipe.load(_recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 1.0}]))
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        if Path(path).name not in ("work", "work.removing") or not Path(path).exists():
            return real_rmtree(path, *args, **kwargs)
        for part in Path(path).glob("tokens/english/*"):
            part.unlink()  # some files are gone, then the job dies
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        build_mix.build(recipe)
    monkeypatch.setattr(pipeline.shutil, "rmtree", real_rmtree)
    data = (recipe.out / "english_text_document.bin").read_bytes()
    mix = build_mix.build(recipe)
    assert (recipe.out / "english_text_document.bin").read_bytes() == data and mix["sources"]["english"]["tokens"] > 0
    assert not (recipe.out / "work").exists() and not (recipe.out / "work.removing").exists()


def test_a_rerun_with_a_changed_recipe_stops_naming_what_changed(tmp_path):
    """Finished stages are not redone, so relaxing a filter and rerunning would silently change nothing."""
    raw = _templated_notes(tmp_path, [{"name": "english", "paths": [str(DEMO / "en" / "*.jsonl")], "share": 0.5}])
    with pytest.raises(NoDocuments, match="gopher_repetition"):
        build_mix.build(MixRecipe(**raw))
    raw["sources"][0]["filters"]["gopher_repetition"] = None  # relaxed, as the error advises
    with pytest.raises(BuildError, match=r"built with other settings or inputs \(sources changed\); rerun with --clean"):
        build_mix.build(MixRecipe(**raw))
    shutil.rmtree(tmp_path / "out")  # --clean
    mix = build_mix.build(MixRecipe(**raw))
    assert mix["sources"]["notes"]["documents"] > 0
    with pytest.raises(BuildError, match=r"\(seq_length changed\)"):  # a finished build is not returned for another recipe
        build_mix.build(MixRecipe(**{**raw, "seq_length": 64}))
    assert build_mix.build(MixRecipe(**raw)) == mix
    # a build begun when files were shared out over the tasks otherwise (the runs of guarded sources came later):
    # resumed, its unfinished tasks would read some records twice and others never
    settings = tmp_path / "out" / "recipe.resolved.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "read_sharding"}))
    with pytest.raises(BuildError, match=r"\(read_sharding changed\); rerun with --clean"):
        build_mix.build(MixRecipe(**raw))


def test_a_rerun_after_its_input_files_changed_stops_naming_them(tmp_path):
    """Files are split over the tasks by their place in the list: one added, removed or rewritten between a killed
    run and its resumption left some files unread and others read twice (and the report said nothing was missing)."""
    from preprocessing.pipeline import check_recipe

    data = tmp_path / "data"
    shutil.copytree(DEMO / "en", data / "en")
    recipe = MixRecipe.load(_recipe(tmp_path, sources=[{"name": "english", "paths": [str(data / "en" / "*.jsonl")],
                                                        "share": 1.0}]))
    check_recipe(recipe)
    check_recipe(recipe)  # the same files: resumes
    (data / "en" / "more.jsonl").write_text('{"text": "Another page."}\n')
    with pytest.raises(BuildError, match=r"\(input_files \(added \S+/en/more\.jsonl\) changed\); rerun with --clean"):
        check_recipe(recipe)
    (data / "en" / "more.jsonl").unlink()
    first = sorted((data / "en").glob("*.jsonl"))[0]
    with open(first, "a") as f:
        f.write('{"text": "Appended."}\n')
    with pytest.raises(BuildError, match=rf"\(input_files \(changed \S+/{first.name}\) changed\)"):
        check_recipe(recipe)


def test_the_build_reads_the_files_it_recorded(tmp_path, monkeypatch):
    """The sources' folders are walked once: the files recorded in recipe.resolved.json are the files read (a second
    walk for the reader would read a file created in between without recording it)."""
    from preprocessing import pipeline

    recipe = MixRecipe.load(_recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 1.0}]))
    walks = []
    walk = MixRecipe.source_files
    monkeypatch.setattr(MixRecipe, "source_files", lambda self: walks.append(1) or walk(self))
    assert pipeline.run_stages(recipe, until="clean")
    assert len(walks) == 1


def test_a_build_killed_mid_stage_resumes_with_fewer_workers(tmp_path):
    """A job killed on a 2-worker node and rerun on a 1-worker one: the unfinished rank runs, none is skipped."""
    recipe = MixRecipe.load(_recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 1.0}]))
    mix = build_mix.build(recipe, workers=2, keep_work=True)
    data = (recipe.out / "english_text_document.bin").read_bytes()
    for done in ("mix.json", "logs/final/completions/00000", "logs/final/stats.json", "logs/final/stats/00000.json"):
        (recipe.out / done).unlink()  # rank 0 of the last stage was killed before it finished
    assert build_mix.build(recipe, workers=1) == mix
    assert (recipe.out / "english_text_document.bin").read_bytes() == data


@pytest.mark.parametrize("bad_line", [b'{"question": "unterminated', b'{"question": "caf\xe9"}'])
def test_a_bad_benchmark_file_stops_the_build_before_any_work_naming_the_line(tmp_path, bad_line):
    """Decontamination needs every benchmark record: a line that is not JSON (or not UTF-8) would let that
    question's text through, so the build stops, in the driver, naming file and line."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.jsonl").write_text(json.dumps({"text": "A patient note. " * 20}) + "\n")
    (tmp_path / "bench.jsonl").write_bytes(json.dumps({"question": "Which artery?"}).encode() + b"\n" + bad_line + b"\n")
    recipe = MixRecipe(tokenizer=str(DEMO / "tokenizer"), output_dir=str(tmp_path / "out"), seq_length=64,
                       base_dir=str(tmp_path), decontaminate=["bench.jsonl"],
                       sources=[{"name": "notes", "paths": ["raw/*.jsonl"], "share": 1.0}])
    with pytest.raises(BuildError, match=rf"decontaminate: {tmp_path / 'bench.jsonl'}:2: not a JSON record"):
        build_mix.build(recipe)
    assert not (tmp_path / "out" / "logs").exists()  # no stage started


def test_a_worker_killed_mid_stage_stops_the_build_naming_the_stage_and_the_rerun_resumes(tmp_path):
    """The OOM killer picks one worker of a stage, not the job: datatrove's pool replaced the dead worker and waited
    forever for its task, so the build hung with no message. It stops now, naming the stage, and the same command
    resumes to the mix one uninterrupted build gives."""
    recipe_path = _recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 0.5},
                                             {"name": "general_medical", "paths": ["med/*.parquet"], "format": "parquet",
                                              "id_key": "doc_id", "share": 0.5}])
    flag = tmp_path / "killed"
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom preprocessing import build_mix, steps\n"
            "read = steps.MixReader.run\n"
            "def run(self, data=None, rank=0, world_size=1):\n"
            "    if rank == 1 and not Path(sys.argv[1]).exists():\n"
            "        Path(sys.argv[1]).write_text('once')\n"
            "        os.kill(os.getpid(), signal.SIGKILL)  # this worker alone\n"
            "    yield from read(self, data, rank, world_size)\n"
            "steps.MixReader.run = run\nbuild_mix.main(sys.argv[2:])\n")
    cmd = [sys.executable, "-c", code, str(flag), "--config", str(recipe_path), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a build whose worker was killed hung instead of stopping")
    assert flag.exists() and proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(r"error: stage clean: a worker process died \(killed: out of memory\?\) with task\(s\) [\d, ]+ "
                        r"unfinished; rerun the same command to resume them", err.strip().splitlines()[-1]), err[-3000:]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = _built(recipe_path)
    fresh = MixRecipe.load(_recipe(tmp_path / "fresh", sources=yaml.safe_load(recipe_path.read_text())["sources"]))
    _assert_same_mix(resumed, (fresh, build_mix.build(fresh, workers=2)))


def test_a_sigterm_to_the_build_alone_ends_its_workers_too(tmp_path):
    """``kill PID`` or ``timeout`` signals the build's own process only: its workers went on (orphans) writing their
    tasks' files into the output folder after the build had let go of it, beside a rerun's worker writing the same
    files. They end with the build now, and the rerun builds."""
    recipe_path = _recipe(tmp_path, sources=[{"name": "english", "paths": ["en/*.jsonl"], "share": 1.0}])
    started = tmp_path / "started"
    code = ("import sys, time\nfrom pathlib import Path\nfrom preprocessing import build_mix, steps\n"
            "def run(self, data=None, rank=0, world_size=1):\n"
            "    Path(sys.argv[1], str(rank)).touch()\n    time.sleep(120)  # a long task\n    yield from ()\n"
            "steps.MixReader.run = run\nbuild_mix.main(sys.argv[2:])\n")
    started.mkdir()
    with own_session([sys.executable, "-c", code, str(started), "--config", str(recipe_path), "--workers", "2"]) as proc:
        deadline = time.time() + 120
        while len(list(started.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(list(started.iterdir())) == 2, "the workers did not start"
        alive = processes_left_by_sigterm(proc)
        assert not alive, f"workers outlived the build: {alive}"
    assert build_mix.build(MixRecipe.load(recipe_path), workers=2)["sources"]["english"]["tokens"] > 0



@pytest.mark.parametrize("command", ["build_mix", "enrich_data", "build_sft"])
def test_workers_below_one_are_refused_before_clean_empties_the_output(tmp_path, command, capsys):
    import importlib

    out = tmp_path / "mix"
    out.mkdir()
    (out / "kept").write_text("a finished build's file")
    recipe = _recipe(tmp_path)
    args = ["--config", str(recipe), "--workers", "0"] + (["--clean"] if command != "enrich_data" else [])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(f"preprocessing.{command}").main(args)
    assert stopped.value.code == 2
    assert "argument --workers: must be at least 1, got 0" in capsys.readouterr().err
    assert (out / "kept").is_file()


def test_bench_tokenize_runs(capsys):
    """The tokenising benchmark runs the build's own writer and merge, so it breaks when they change (it did: the
    merge's document and token checks took two more arguments): a small corpus through it, both sides agreeing."""
    import logging

    from tools import bench_tokenize

    try:
        bench_tokenize.main(["--docs", "60", "--workers", "2", "--tokenizer", str(DEMO / "tokenizer")])
    finally:
        logging.disable(logging.NOTSET)  # the script silences logging for its whole process
    assert "| datatrove MegatronTokenWriter (2 tasks, batched) + merge |" in capsys.readouterr().out
