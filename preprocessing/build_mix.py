"""Raw per-source corpora -> the weighted CPT mix the trainer reads.

    python -m preprocessing.build_mix --config recipe.yaml [--workers N] [--executor local|slurm|ray] [--keep-work]

Runs (or resumes) the datatrove stages of :mod:`preprocessing.pipeline`, then, in this process: merges the
per-rank binaries per source, writes ``mix.json`` and the report, and removes ``output_dir/work/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil

from preprocessing.atomic import write_json_atomic
from preprocessing.pipeline import add_executor_args, build_command, built, check_recipe, load_recipe, remove_work, run_stages
from preprocessing.recipe import MixRecipe

log = logging.getLogger(__name__)
EPOCH_WARNING = 4.0


# ------------------------------------------------------------------------------------------- merging


def merge_tokens(recipe: MixRecipe, ledger: dict) -> dict[str, str]:
    """One megatron indexed dataset per source from the per-rank ones, holding the documents and tokens the
    ledger counted; returns source -> prefix."""
    from preprocessing.steps import merge_indexed
    from preprocessing.tokenizer import load_tokenizer, token_dtype

    dtype = token_dtype(load_tokenizer(str(recipe.resolve(recipe.tokenizer))).get_vocab_size())
    prefixes = {}
    for source in recipe.sources:
        parts = sorted((recipe.out / "work" / "tokens" / source.name).glob("*.idx"))
        name = f"{source.name}_text_document"
        merge_indexed(parts, recipe.out / name, dtype, ledger[source.name]["chunks"], ledger[source.name]["tokens"])
        prefixes[source.name] = name
    return prefixes


def merge_heldout(recipe: MixRecipe) -> dict[str, str]:
    out = recipe.out / "heldout"
    out.mkdir(exist_ok=True)
    files = {}
    for source in recipe.sources:
        target = out / f"{source.name}.jsonl"
        with open(f"{target}.tmp", "wb") as f:
            for part in sorted((recipe.out / "work" / "heldout" / source.name).glob("*.jsonl")):
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, f)  # in blocks: a part is never read whole
        os.replace(f"{target}.tmp", target)
        files[source.name] = str(target.relative_to(recipe.out))
    return files


def mix_json(recipe: MixRecipe, prefixes: dict[str, str], heldout: dict[str, str], ledger: dict) -> dict:
    """Blend weights: every sample the trainer draws is ``seq_length`` tokens whatever its source, so the
    token share of a source equals its sample share, i.e. its blend weight is its target share."""
    from preprocessing.tokenizer import bundle_tokenizer

    sources = {}
    for s in recipe.sources:
        tokens = ledger[s.name].get("tokens", 0)
        epochs = s.share * recipe.token_budget / tokens if tokens else float("inf")
        if epochs > EPOCH_WARNING:
            log.warning("source %s: %.1f epochs to reach its %.0f%% of %d tokens (> %g): consider more data or a "
                        "smaller share", s.name, epochs, 100 * s.share, recipe.token_budget, EPOCH_WARNING)
        sources[s.name] = {"prefix": prefixes[s.name], "documents": ledger[s.name].get("chunks", 0), "tokens": tokens,
                           "share": s.share, "weight": s.share, "epochs": round(epochs, 3), "heldout": heldout[s.name]}
    return {
        "seq_length": recipe.seq_length,
        "token_budget": recipe.token_budget,
        "tokenizer": bundle_tokenizer(recipe.resolve(recipe.tokenizer), recipe.out),  # relative: the mix can move
        "sources": sources,
        # megatron's data_path form: weight prefix weight prefix ...
        "data_path": [x for s in sources.values() for x in (s["weight"], s["prefix"])],
    }


# -------------------------------------------------------------------------------------------- driver


def build(recipe: MixRecipe, workers: int = 1, executor: str = "local", keep_work: bool = False, **cluster) -> dict | None:
    """Run (or resume) every stage, then merge, mix.json and report; then remove ``work/`` (the per-worker
    copies of every token) unless ``keep_work``. Returns mix.json's content, or None when cluster jobs were
    submitted and are still to finish (rerun the same command then). A source that lost every document
    stops the build (:func:`preprocessing.report.check_survivors`)."""
    from preprocessing.report import collect_ledger, write_report

    out = recipe.out
    if (mix := built(out, "mix.json")) is not None:
        check_recipe(recipe)
        return mix
    if not run_stages(recipe, workers, executor, **cluster):
        return None
    ledger = collect_ledger(out / "logs", [s.name for s in recipe.sources])
    log.info("merging the tasks' token files and held-out splits per source, then the report")
    mix = mix_json(recipe, merge_tokens(recipe, ledger), merge_heldout(recipe), ledger)
    write_json_atomic(out / "mix.json", mix)
    write_report(recipe, ledger, mix, out)
    if not keep_work:
        remove_work(out)
    return mix


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML")
    add_executor_args(p)
    p.add_argument("--clean", action="store_true", help="delete output_dir first instead of resuming")
    p.add_argument("--keep-work", action="store_true", help="keep output_dir/work/ (per-worker intermediates) after the merge")
    p.add_argument("--verbose", action="store_true", help="every library's log on the console (always in output_dir/build_mix.log)")
    args = p.parse_args(argv)
    recipe = load_recipe(MixRecipe.load, args.config)
    with build_command(recipe.out, "build_mix", args.verbose, clean=args.clean):
        mix = build(recipe, args.workers, args.executor, args.keep_work, partition=args.partition, time=args.time)
    if mix is not None:
        print((recipe.out / "report.md").read_text())


if __name__ == "__main__":
    main()
