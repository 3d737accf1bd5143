"""The PHI guard on the labelled synthetic evaluation set (``tests/phi_eval_set.py``): recall per Safe Harbor
kind, no eponym, drug name or upstream placeholder touched, and the same through the real ``build_mix``
(datatrove executors, the demo tokenizer): the token files hold no planted identifier, and every eponym, drug
name and placeholder of the notes and of the identifier-free notes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from phi_eval_set import (DRUGS, EPONYMS, PLACEHOLDERS, clean_notes, phi_notes, protected_terms_hit, recall_by_kind,
                          removed)
from preprocessing import build_mix
from preprocessing.phi import KINDS, phi_spans, redact_phi
from preprocessing.recipe import MixRecipe
from preprocessing.steps import normalize_text

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="module")
def eval_set():
    notes, clean = phi_notes(120, seed=11), clean_notes(80, seed=12)
    return notes, [phi_spans(n.text) for n in notes], clean, [phi_spans(t) for t in clean]


def test_recall_per_kind_and_overall(eval_set):
    """Issue 13's goals (95% overall, 90% each kind), and more: the guard catches every identifier this seeded set
    plants (docs/benchmarks.md: 100%, as on the 400-note set), so one it misses is a regression, named here."""
    notes, spans, _, _ = eval_set
    recall = recall_by_kind(notes, spans)
    assert set(recall) == set(KINDS)  # the set plants every kind the guard names
    low = {k: f"{a}/{b}" for k, (a, b) in recall.items() if a < 0.9 * b}
    assert not low, low
    found, planted = (sum(x) for x in zip(*recall.values()))
    assert found >= 0.95 * planted, (found, planted)
    missed = [(kind, note.text[start:end]) for note, found in zip(notes, spans) for kind, start, end in note.labels
              if not removed(note.text, start, end, found)]
    assert not missed, missed


def test_eponyms_drugs_and_placeholders_are_kept(eval_set):
    notes, spans, clean, clean_spans = eval_set
    assert not protected_terms_hit(clean, clean_spans)
    assert not protected_terms_hit([n.text for n in notes], spans)
    words = sum(len(t.split()) for t in clean)
    assert sum(map(len, clean_spans)) <= words / 1000, [(t[s.start:s.end], s.kind) for t, ss in zip(clean, clean_spans) for s in ss]


def test_the_issues_examples_are_caught():
    text = ("Patient John Smith was seen by Dr. Alice Wong. Ms. Garcia, 45F. MRN#: A1234567. Acct no. 00482913. "
            "SSN 123 45 6789. Lives at 42 Maple Street, Springfield, IL 62704. Health plan HP-99812345. "
            "Seen from 192.168.14.22.")
    clean = redact_phi(text)
    for value in ("John", "Smith", "Alice", "Wong", "Garcia", "A1234567", "00482913", "123 45 6789", "Maple",
                  "Springfield", "62704", "99812345", "192.168"):
        assert value not in clean, (value, clean)
    assert clean.startswith("Patient [NAME] was seen by Dr. [NAME]. Ms. [NAME], 45F. MRN#: [MRN]. Acct no. [ACCOUNT]. SSN [SSN].")


def test_compact_dates_and_birth_years_over_89_are_dates():
    """Safe Harbor removes a year that shows an age over 89, and a date written YYYYMMDD after a date's cue; a recent
    birth year, and eight digits without a cue, stay."""
    import datetime

    old, recent = datetime.date.today().year - 91, datetime.date.today().year - 60
    for text, kept in ((f"Born {old} in Ohio.", "Born [DATE] in Ohio."), (f"YOB: {old}", "YOB: [DATE]"),
                       (f"b. {old}, widowed", "b. [DATE], widowed"), (f"Born {recent}; retired.", f"Born {recent}; retired."),
                       ("Date of service: 20210304.", "Date of service: [DATE]."), ("Lot 19991231 used.", "Lot 19991231 used.")):
        assert redact_phi(text) == kept


def _squash(text: str) -> str:
    return "".join(text.split())


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def _kept_text(recipe: MixRecipe, source: str) -> str:
    """The source's training documents decoded from its token file, and its held-out documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(recipe.resolve(recipe.tokenizer) / "tokenizer.json"))
    ds = IndexedDataset(str(recipe.out / f"{source}_text_document"))
    heldout = [json.loads(x)["text"] for x in (recipe.out / "heldout" / f"{source}.jsonl").read_text().splitlines()]
    return "\n".join([tok.decode(ds[i].tolist()) for i in range(len(ds))] + heldout)


def test_build_mix_redacts_the_labelled_notes_and_keeps_clinical_text(tmp_path):
    notes, clean = phi_notes(100, seed=21), clean_notes(60, seed=22)
    _write_jsonl(tmp_path / "raw" / "ehr.jsonl", [n.text for n in notes])
    _write_jsonl(tmp_path / "raw" / "clinical.jsonl", clean)
    _write_jsonl(tmp_path / "raw" / "ehr_drop.jsonl", [n.text for n in phi_notes(10, seed=23)] + clean_notes(10, seed=24))
    filters = {"min_chars": 50, "gopher_quality": None, "gopher_repetition": None}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "tokenizer": str(DEMO / "tokenizer"), "output_dir": str(tmp_path / "mix"), "seq_length": 4096,
        "token_budget": 10_000, "heldout_fraction": 0.1,
        "sources": [{"name": "ehr", "paths": ["raw/ehr.jsonl"], "share": 0.5, "phi_guard": True, "filters": filters},
                    {"name": "clinical", "paths": ["raw/clinical.jsonl"], "share": 0.3, "phi_guard": True, "filters": filters},
                    {"name": "ehr_drop", "paths": ["raw/ehr_drop.jsonl"], "share": 0.2, "phi_guard": True,
                     "phi_policy": "drop", "filters": filters}]}))
    recipe = MixRecipe.load(recipe_path)
    build_mix.build(recipe)
    from preprocessing.report import collect_ledger

    ledger = collect_ledger(recipe.out / "logs", ["ehr", "clinical", "ehr_drop"])
    for source, n in (("ehr", 100), ("clinical", 60)):  # nothing dropped: the counts below compare whole sources
        assert ledger[source]["read"] == ledger[source]["kept"] + ledger[source]["heldout"] == n, ledger[source]
    assert ledger["ehr_drop"]["dropped"] == {"phi": 10} and ledger["ehr_drop"]["kept"] + ledger["ehr_drop"]["heldout"] == 10
    assert set(ledger["ehr"]["phi"]) == set(KINDS) and not ledger["clinical"]["phi"]
    report = (recipe.out / "report.md").read_text()
    assert "| ehr | name |" in report and "| ehr | mrn |" in report

    # a planted identifier has leaked when it occurs in the kept text more often than the notes' own clinical
    # text has it (the notes with every identifier cut out: an age "99" is also in "Tmax 99 F")
    kept = _squash(_kept_text(recipe, "ehr"))
    skeleton = _squash("\n".join(normalize_text("".join(
        "\0" if any(a <= i < b for _, a, b in n.labels) else c for i, c in enumerate(n.text))) for n in notes))
    planted = {_squash(normalize_text(n.text[a:b])) for n in notes for _, a, b in n.labels}
    assert len(planted) > 400
    leaked = [v for v in planted if kept.count(v) > skeleton.count(v)]
    assert not leaked, leaked
    assert "[NAME]" in kept and "[MRN]" in kept and "[HEALTH_PLAN]" in kept  # the check sees redacted notes
    _assert_terms_kept(kept, skeleton)

    # the identifier-free notes come out whole
    kept = _squash(_kept_text(recipe, "clinical"))
    _assert_terms_kept(kept, _squash("\n".join(normalize_text(t) for t in clean)))
    assert all(_squash(e) in kept for e in EPONYMS[:10])  # the issue's ten are in the set


def _assert_terms_kept(kept: str, raw: str) -> None:
    """Every eponym, drug name and placeholder of ``raw`` is in ``kept`` as often."""
    for term in EPONYMS + DRUGS + PLACEHOLDERS:
        assert kept.count(_squash(term)) == raw.count(_squash(term)), term


@pytest.mark.parametrize("label, value", [("Acct no.", "00482913"), ("Medicare ID:", "1EG4TE5MK73"), ("MRN:", "00123456")])
@pytest.mark.parametrize("gap", [" ", "\n"])
def test_an_identifier_whose_label_ends_a_piece_is_redacted(label, value, gap):
    """A long note is analysed in pieces; where the label ends one and the value (a weak pattern, raised only by
    its label) starts the next, the value was kept. Pieces overlap: the next one repeats the label."""
    from preprocessing.phi import PIECE_CHARS, _pieces

    head = ("The patient reports pain. " * 200)[: PIECE_CHARS - len(label) - 2]
    text = head + " " + label + gap + value + " noted at intake. " + "Rest and fluids. " * 40
    first = next(_pieces(text))[1]
    assert first.endswith(label + gap) or first.endswith(label + " "), "the cut must fall right after the label"
    assert value not in redact_phi(text)


def test_a_long_document_is_analysed_in_pieces_with_the_same_result():
    """Presidio's context scoring is quadratic in a text's length, so a long note goes in pieces of
    ``PIECE_CHARS``; the identifiers found are those of its parts."""
    from preprocessing.phi import PIECE_CHARS

    texts = [n.text for n in phi_notes(30, seed=31)]
    whole = "\n".join(texts)
    assert len(whole) > 4 * PIECE_CHARS
    expected, offset = [], 0
    for t in texts:
        expected += [(s.start + offset, s.end + offset, s.kind) for s in phi_spans(t)]
        offset += len(t) + 1
    assert [tuple(s) for s in phi_spans(whole)] == expected


def test_quarantined_records_of_a_guarded_source_are_redacted(tmp_path):
    """The errors folder travels with the mix: the excerpt of a malformed or text-less record of a ``phi_guard``
    source is redacted as its documents are; another source's is kept as it was, to be fixed."""
    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import MixReader

    lines = ['{"id": "n1", "text": "Patient Mary Jones, SSN 219-09-9999, DOB 01/02/1950  <- cut off',
             json.dumps({"id": "n2", "note": "Patient Ana Reyes, phone 617-555-1234"})]
    (tmp_path / "notes.jsonl").write_text("\n".join(lines) + "\n")
    for guard in (True, False):
        source = SourceConfig(name="ehr", paths=[str(tmp_path / "notes.jsonl")], share=1.0, phi_guard=guard)
        errors = tmp_path / f"errors_{guard}"
        assert list(MixReader([(source, str(tmp_path / "notes.jsonl"))], str(errors), 10_000).run()) == []
        excerpts = [json.loads(x)["excerpt"] for x in (errors / "read_00000.jsonl").read_text().splitlines()]
        raw = ("Mary Jones", "219-09-9999", "01/02/1950", "Ana Reyes", "617-555-1234")
        if guard:
            assert not [r for r in raw if any(r in e for e in excerpts)] and "[PHONE]" in excerpts[1]
        else:
            assert all(any(r in e for e in excerpts) for r in raw)


# ------------------------------------------------------------------------------------------- the independent audit
# Formats found missing on the DEV half of tests/phi_holdout_set.py (an independent set written without the guard's
# tuning set); each test failed on the guard before its fix.


def _kept(text: str, *values: str) -> list[str]:
    """The ``values`` that survive redaction of ``text`` (any of their letters or digits left)."""
    spans = phi_spans(text)
    out = []
    for v in values:
        start = text.index(v)
        if not removed(text, start, start + len(v), spans):
            out.append(v)
    return out


def test_a_number_does_not_run_into_the_word_after_it():
    """The phone recognizer read "1" of "1p/19q" (a glioma's codeletion) as an extension of the SSN before it."""
    assert redact_phi("SSN 219-09-9999 1p/19q codeleted.") == "SSN [SSN] 1p/19q codeleted."
    assert redact_phi("Call 617-555-1234 ext 22 today.") == "Call [PHONE] today."


def test_month_names_are_dates_only_as_whole_words():
    """The month alternation was left ungrouped, so every "May" and "March" was a date, inside a word too."""
    for text in ("Started Mayzent 2 mg daily.", "Concern for Marchiafava-Bignami disease.", "May consider LP tomorrow."):
        assert redact_phi(text) == text
    assert redact_phi("Not seen since March.") == "Not seen since [DATE]."


def test_timestamps_and_short_dates():
    text = ("Admit date: 2021-03-04T10:22. MRI 04/07: stable. Symptom onset 10/17 around noon. LKW 11/16. Last "
            "infusion 04/2023, relapse 11-2020.")
    assert not _kept(text, "2021-03-04T10:22", "04/07", "10/17", "11/16", "04/2023", "11-2020")
    for text in ("Pain 3/10, strength 4/5, MoCA 10/30, 20/20 vision, 1/2 tab.", "Onset 2019; 12/30 tablets left.",
                 "BP 120/80, C5-C6, ratio 1/20."):
        assert redact_phi(text) == text


def test_ages_over_89_in_words():
    text = ("A ninety-two-year-old F. Age ninety-one. He is one hundred and two, still drives. ninety-nine F with "
            "aphasia. A one hundred-year-old woman.")
    assert not _kept(text, "ninety-two", "ninety-one", "one hundred and two", "ninety-nine", "one hundred")
    for text in ("Infused over ninety minutes; ninety percent stenosis; HR ninety.",
                 "She is one hundred percent compliant; he is ninety percent better."):
        assert redact_phi(text) == text


def test_labelled_values_with_spaces_and_more_labels():
    text = ("SSN: 575 - 57 - 6938. DL# RN-341837. NPI X731-0266-7013. Research subject 5125-NX. Path #: ORD73236668. "
            "License plate SNG 4319. plate: CL8 W66. Pacemaker SN: (01)78791903954415(21)XV97947.")
    assert not _kept(text, "575 - 57 - 6938", "RN-341837", "X731-0266-7013", "5125-NX", "ORD73236668", "SNG 4319",
                     "CL8 W66", "(01)78791903954415(21)XV97947")
    for text in ("ACDF with anterior plate C5 C6 fixation; plate and screws intact.", "Glucose 95 mg/dL, DLCO 65%.",
                 "Plate: C5 C6 intact. Hardware: plate C5-C7."):
        assert redact_phi(text) == text


def test_spelled_out_email_addresses():
    text = "Email: quinn.rahimi at EXAMPLE dot com. Or kealoha.m[at]inbox.example.net please."
    assert not _kept(text, "quinn.rahimi at EXAMPLE dot com", "kealoha.m[at]inbox.example.net")
    assert redact_phi("Seen at home; met at clinic.") == "Seen at home; met at clinic."


def test_more_street_and_city_formats():
    text = ("Mail to 9978 Applegate Crescent Suite 516. Home: 3235 Old Mill Pike; Duluth NM 58076. Mail to 10 W. 38th "
            "St., Apt. 9-E. Home: 6092 Route 9. 960 Old Mill Pike; St. Augustine ME 42430. Emigrated from Cebu in 2000. "
            "Transferred from an outside hospital in Bozeman.")
    assert not _kept(text, "9978 Applegate Crescent Suite 516", "3235 Old Mill Pike", "Duluth", "10 W. 38th St., Apt. 9-E",
                     "6092 Route 9", "St. Augustine", "Cebu", "Bozeman")
    text = "6 Minute Walk Test 300 m; 2 Mile Run tolerated."
    assert redact_phi(text) == text
    # a town in lower case where a sentence ends with it after "lives (alone) in"; not what else one lives in
    assert redact_phi("Lives alone in coeur d'alene. Lives in walla walla, works.") == "Lives alone in [CITY]. Lives in [CITY], works."
    for text in ("Lives in assisted living.", "Lives alone in an apartment.", "Lives in fear of falling.", "Lives in foster care."):
        assert redact_phi(text) == text


def test_names_after_more_cues_in_lower_case_and_as_initials():
    text = ('Goes by "Pepe". Daughter (radhika) wants a call. pt esperanza rahimi seen. Note written by Liorith Todd, '
            "PGY-2. PATIENT: Ochieng, Radhika C. Case reviewed with ZELSTAAD, TADEO. Msg left for Zainab at home.\n"
            "/s/ J.K.\nSon (nyrith) wants a call.\n")
    assert not _kept(text, "Pepe", "radhika", "esperanza rahimi", "Liorith Todd", "Ochieng, Radhika C", "ZELSTAAD, TADEO",
                     "Zainab", "J.K", "nyrith")  # nyrith: in no list, but in brackets of its own after the cue
    assert "PGY-2" in redact_phi(text)
    for text in ("cc Neurohospitalist regarding goals of care.", "Discussed with Neuro-Ophthalmology.",
                 "pt denies headache; son was present.", "Daughter (deceased); son (hcp) at bedside.", "BP stable -- ICU transfer\n", "Plan:\n-- MRI brain\n-- EEG\n-- NPO\n",
                 "Reviewed and agree. /s/ MD\n", "Transferred to Neurology, then from Rehab to Stepdown.",
                 "Native of Spanish-speaking household; transferred from Emergency Department.",
                 "Interpreter: Spanish, in person."):
        assert redact_phi(text) == text


def test_protein_changes_gene_symbols_and_diseases_named_after_people_or_places_are_kept():
    """philter-lite's unlabelled id rules took protein changes, gene symbols and antigen names for ids (labelled, such
    a value is still caught), and the name pairs took Foster Kennedy syndrome and Rocky Mountain spotted fever for
    people; an id with a longer run of digits stays an id."""
    for text in ("BRAF V600E positive; IDH1 R132H mutant; LRRK2 G2019S carrier.", "Foster Kennedy syndrome.",
                 "Pathogenic SCN1A variant; GRIN2B, CACNA1A, COL4A1 and SLC2A1 panels; CYP2C19 poor metabolizer.",
                 "Anti-GQ1b IgG positive; CD45RO+ cells.", "Treated for Rocky Mountain spotted fever."):
        assert redact_phi(text) == text
    assert redact_phi("MRN: V600E") == "MRN: [MRN]"
    assert redact_phi("Specimen SCN1A") == "Specimen [OTHER_ID]"
    assert redact_phi("Sent as XK4419B today.") == "Sent as [OTHER_ID] today."
    assert redact_phi("Seen by Rocky Mountain today.") == "Seen by [NAME] today."
    assert redact_phi("Fellow: Halvorsen, Ifeoma E. PSEN1 positive.") == "Fellow: [NAME]. PSEN1 positive."
    assert redact_phi("Fellow: Mirola N. Mwangi MAPT positive.") == "Fellow: [NAME] MAPT positive."
    assert redact_phi("Fellow: Jean DUPONT") == "Fellow: [NAME]"  # a listed surname in capitals stays part of the name


def test_a_names_particles_are_part_of_it():
    """The name lists hold "de", "van", "ben" as words of their own: a found name takes the particles around it and
    the surname after them; "de novo" is no surname."""
    assert redact_phi("pt agnieszka de la cruz seen today.") == "pt [NAME] seen today."
    assert redact_phi("Seen by Dr. van der Berg today.") == "Seen by Dr. [NAME] today."
    assert redact_phi("Note by Keoni Le Roux, PGY-2.") == "Note by [NAME], PGY-2."
    assert redact_phi("Seen by Dr. Okafor; de novo lesion.") == "Seen by Dr. [NAME]; de novo lesion."
    assert redact_phi("Dr. Okafor de novo lesion.") == "Dr. [NAME] de novo lesion."
    assert redact_phi("Seen by Dr. J. Okafor today.") == "Seen by Dr. [NAME] today."  # the initial after a title too


def test_names_before_what_notes_say_of_a_person():
    """A name with no cue before it, but one after: "<name> family", "<name> presented", "<name> is a 67-year-old",
    a nurse's initials told of something; not a pronoun, a role or a common word there (nor a first name that is a
    common word, alone before a credential: "Per RN"), a family that is no people ("family history", "Rho family
    GTPases"), nor a unit told of something ("RN ICU notified")."""
    for text, name in (("Tamanko family requests a meeting.", "Tamanko"), ("Faith Bell presented to the ED.", "Faith Bell"),
                       ("Jackson, Rangi C. presented after a fall.", "Jackson, Rangi C"),  # a span leaves its last dot out
                       ("ABERNATHY, LWAZI presented to the ED.", "ABERNATHY, LWAZI"),
                       ("Kenji Lindqvist is a 67-year-old man.", "Kenji Lindqvist"),
                       ("seen today; hamid rahimi presented after a fall.", "hamid rahimi"),
                       ("RN WK notified of the result.", "WK"), ("LPN D.V. aware.", "D.V")):
        assert redact_phi(text) == text.replace(name, "[NAME]"), text
    for text in ("Her family requests a meeting.", "Huntington family history.", "Family medicine follow-up.",
                 "Patient presented to the ED.", "She presented with aphasia.", "He is a 45 year-old man.",
                 "The patient is a 45-year-old man.", "Symptoms presented gradually.", "the patient presented today.",
                 "her family requests a meeting.", "Per RN report, no events.", "RN MD notified.", "RN notified.",
                 "Glasgow Coma Scale presented.", "Rho family GTPases.", "Kinase family proteins.", "RN ICU notified.",
                 "Host family notified.", "Foster family present at bedside.", "Adoptive family present."):
        assert redact_phi(text) == text


def test_independent_dev_half_floor():
    """The DEV half of the independent set (tests/phi_holdout_set.py; its HELDOUT half is for bench_phi only, never
    for tests or tuning): recall and false positives as measured after the audit's fixes, less a margin."""
    from phi_holdout_set import DEV, holdout_clean_notes, holdout_notes, traps_hit

    notes, clean = holdout_notes(DEV, 60), holdout_clean_notes(DEV, 40)
    spans, clean_spans = [phi_spans(n.text) for n in notes], [phi_spans(t) for t in clean]
    found, planted = (sum(x) for x in zip(*recall_by_kind(notes, spans).values()))
    assert found >= 0.95 * planted, (found, planted)  # 97.2% (514 of 529) on 2026-11-29
    words = sum(len(t.split()) for t in clean)
    assert sum(map(len, clean_spans)) <= 2 * words / 1000, [t[s.start:s.end] for t, ss in zip(clean, clean_spans) for s in ss]
    assert len(traps_hit(clean, clean_spans)) <= 2 * words / 1000


# ------------------------------------------------------------------------------------------- a model beside the rules
# The recipe's phi_model: a local de-identification model (tests/tiny_deid.py builds one that tags chosen words).

TAGGED = {"zorblatt": "PATIENT", "quennick": "HOSP", "neurologist": "PROFESSION", "parkinson": "PATIENT",
          "guillain": "PATIENT", "wilson": "PATIENT"}


@pytest.fixture(scope="module")
def deid_model(tmp_path_factory):
    from tiny_deid import write_tiny_deid_model

    return write_tiny_deid_model(tmp_path_factory.mktemp("deid"), TAGGED)


def test_a_model_adds_what_the_rules_miss_in_chunks_of_its_context(deid_model):
    """A lower-case name with no cue, which the rules miss, is redacted with the model, also in the last of the
    chunks a text longer than the model's 16-token context is cut into; the rules' finds stay; a label mapped to
    null (a profession) is kept, and a label a recipe maps itself takes that kind."""
    from preprocessing.phi import PHIModel, model_labels

    text = ("MRN: 00123456. Seen by the neurologist at quennick today. " + "No new deficits. " * 6
            + "Daughter zorblatt visited.")
    model = PHIModel(str(deid_model), model_labels(str(deid_model)))
    assert dict(model.labels) == {"PATIENT": "name", "HOSP": "address", "PROFESSION": None}
    assert redact_phi(text) == text.replace("00123456", "[MRN]")  # the rules alone
    assert redact_phi(text, model=model) == (text.replace("00123456", "[MRN]").replace("quennick", "[ADDRESS]")
                                             .replace("zorblatt", "[NAME]"))
    as_city = PHIModel(str(deid_model), model_labels(str(deid_model), {"hosp": "city"}))
    assert "at [CITY] today" in redact_phi(text, model=as_city)


def test_eponyms_a_model_tags_as_names_are_kept_where_they_name_a_disease(deid_model):
    """A model tags every "Parkinson", "Guillain" and "Wilson" as a patient (as models trained on general text do):
    the eponyms before what they name, hyphened, or a disease by themselves stay; the same words as people go."""
    from preprocessing.phi import PHIModel, model_labels

    model = PHIModel(str(deid_model), model_labels(str(deid_model)))
    kept = ("Dx: Parkinson's disease; Guillain-Barré syndrome in 2019, a history of Parkinson's, and guillain-barre "
            "once. Wilson disease and Parkinson  Disease ruled out.")
    assert redact_phi(kept, model=model) == kept
    people = "Parkinson came in with Martin Wilson, and Wilson's wife."
    assert redact_phi(people, model=model) == "[NAME] came in with Martin [NAME], and [NAME]'s wife."


def test_an_eponym_a_model_tags_with_its_noun_as_one_name_is_kept(tmp_path):
    """A model that takes the noun into the name ("Parkinson disease" one entity, the noun tagged I-): kept; the
    eponym as a person still goes."""
    from preprocessing.phi import PHIModel, model_labels
    from tiny_deid import write_tiny_deid_model

    path = str(write_tiny_deid_model(tmp_path / "m", {"parkinson": "PATIENT", "disease": "I-PATIENT"}))
    model = PHIModel(path, model_labels(path), "cpu")
    text = "Dx: Parkinson disease. Seen by Parkinson today."
    assert redact_phi(text, model=model) == "Dx: Parkinson disease. Seen by [NAME] today."


def test_a_models_labels_must_each_have_a_kind(deid_model, tmp_path):
    from preprocessing.phi import model_labels
    from preprocessing.recipe import MixRecipe, PHIModelConfig
    from tiny_deid import write_tiny_deid_model

    other = write_tiny_deid_model(tmp_path / "other", {"zorblatt": "NICKNAME"})
    with pytest.raises(ValueError, match=r"the labels \['NICKNAME'\] of .*other have no kind; map each under phi_model.labels"):
        model_labels(str(other))
    assert model_labels(str(other), {"NICKNAME": "name"}) == (("NICKNAME", "name"),)
    with pytest.raises(ValueError, match=r"\{'NICKNAME': 'nickname'\} map to no kind"):
        model_labels(str(other), {"NICKNAME": "nickname"})
    with pytest.raises(FileNotFoundError, match=r"phi_model: .*missing/config.json not found"):
        model_labels(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="phi_model.device must be auto, cpu, cuda or cuda:N"):
        PHIModelConfig(str(deid_model), device="gpu")
    source = {"name": "ehr", "paths": ["*.jsonl"], "share": 1.0}
    with pytest.raises(ValueError, match="phi_model is set, but no source has phi_guard: true"):
        MixRecipe(tokenizer="t", output_dir="o", sources=[source], phi_model={"path": str(deid_model)})
    guarded = dict(tokenizer="t", output_dir="o", sources=[{**source, "phi_guard": True}], base_dir=str(tmp_path))
    recipe = MixRecipe(**guarded, phi_model={"path": "other", "labels": {"NICKNAME": "name"}, "device": "cpu"})
    assert recipe.phi_model_spec == (str(other), (("NICKNAME", "name"),), "cpu", None)  # relative to the recipe's folder
    with pytest.raises(ValueError, match="phi_model.batch_size must be positive, not 0"):
        PHIModelConfig(str(deid_model), batch_size=0)
    with pytest.raises(ValueError, match=r"the labels \['NICKNAME'\]"):  # when the recipe loads, not in a worker
        MixRecipe(**guarded, phi_model={"path": "other"})


def test_the_models_device_spreads_a_builds_workers_over_the_gpus(deid_model, monkeypatch):
    """``device: auto`` on a node with 4 GPUs (CUDA faked: this machine has none): a local build's forked worker of
    slot 5 takes GPU 1, one worker (slot 0) GPU 0; without CUDA the CPU; a device given is kept."""
    import torch

    from preprocessing import local_executor
    from preprocessing.phi import PHIModel, model_batch_size, model_device

    auto = PHIModel(str(deid_model), (("PATIENT", "name"),))
    assert model_device(auto) == "cpu" and model_device(auto._replace(device="cuda:3")) == "cuda:3"
    assert model_batch_size(auto) == 1 and model_batch_size(auto._replace(device="cuda")) == 32  # a batch pads: 1 on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert model_device(auto) == "cuda:0" and model_batch_size(auto) == 32
    assert model_batch_size(auto._replace(batch_size=8)) == model_batch_size(auto._replace(device="cpu", batch_size=8)) == 8
    monkeypatch.setattr(local_executor, "_SLOT", 5)
    assert model_device(auto) == "cuda:1" and model_device(auto._replace(device="cpu")) == "cpu"


def test_a_failing_model_stops_the_guard_naming_the_document(tmp_path):
    """Presidio's recognizer logs a chunk its model fails on and goes on without it; the guard stops instead, naming
    the source and the document (here a model whose context is longer than its position embeddings)."""
    from datatrove.data import Document

    from preprocessing.phi import PHIModel, PHIModelError, model_labels
    from preprocessing.recipe import SourceConfig
    from preprocessing.steps import PHIGuard
    from tiny_deid import write_tiny_deid_model

    broken = write_tiny_deid_model(tmp_path / "broken", {"zorblatt": "PATIENT"}, context=16, positions=8)
    model = PHIModel(str(broken), model_labels(str(broken)), "cpu")
    guard = PHIGuard([SourceConfig(name="ehr", paths=[], share=1.0, phi_guard=True)], model)
    # one batch: the short note alone passes (it fits the 8 positions), the batch fails, and so does note-7 alone
    docs = [Document(text="Seen.", id="note-6", metadata={"source": "ehr"}),
            Document(text="Seen today. " * 10, id="note-7", metadata={"source": "ehr"})]
    with pytest.raises(PHIModelError, match=r"source ehr, document note-7: the PHI model .*broken failed: RuntimeError"):
        list(guard.run(iter(docs)))


def test_the_model_runs_a_batch_of_documents_chunks_together_with_the_finds_of_each_alone(tmp_path):
    """The guard passes the model a batch of documents: their chunks (of its 16-token context) run ``batch_size`` to
    a forward pass, each chunk once, and each document's finds are those it has alone (a model with attention layers
    and random weights, whose tags would move if a padded token or another chunk's answer leaked in)."""
    import random

    from preprocessing import phi
    from tiny_deid import write_tiny_deid_model

    path = str(write_tiny_deid_model(tmp_path / "random", {"zorblatt": "PATIENT", "quennick": "HOSP"}, random_layers=2))
    rng = random.Random(0)
    words = "zorblatt quennick seen today for follow up of seizures no new deficits".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + "." for _ in range(7)]
    alone = [phi.phi_spans(t, phi.PHIModel(path, phi.model_labels(path), "cpu", 1)) for t in texts]
    model = phi.PHIModel(path, phi.model_labels(path), "cpu", 4)
    recognizer = phi._model_recognizer(model)
    recognizer.load()
    sizes = []
    recognizer.ner_pipeline.pipeline.model.register_forward_hook(
        lambda module, args, kwargs, out: sizes.append(len(kwargs["input_ids"])), with_kwargs=True)
    assert phi.phi_spans_of(texts, model) == alone and sum(map(len, alone)) > 50
    chunks = {c.text for t in texts for c in recognizer.text_chunker.chunk(t)}
    assert sum(sizes) == len(chunks) > 12 and max(sizes) == 4, sizes


def test_build_mix_runs_the_model_on_guarded_sources_and_records_its_files(deid_model, tmp_path):
    """Through build_mix (its executor's two forked workers): the guarded source's documents and the excerpt of its
    quarantined record lose what the model finds, counted in the ledger; another source keeps it; the model's
    files are recorded with the build's settings, so a rerun after they changed stops, naming them."""
    import shutil

    from preprocessing.errors import BuildError
    from preprocessing.report import collect_ledger

    _write_jsonl(tmp_path / "raw" / "ehr.jsonl", [t + "\ndaughter zorblatt visited." for t in clean_notes(8, seed=41)])
    with open(tmp_path / "raw" / "ehr.jsonl", "a") as f:
        f.write('{"id": "cut", "text": "zorblatt called about the results\n')
    _write_jsonl(tmp_path / "raw" / "papers.jsonl", [t + "\nthe zorblatt assay." for t in clean_notes(8, seed=42)])
    shutil.copytree(deid_model, tmp_path / "deid")
    filters = {"min_chars": 20, "gopher_quality": None, "gopher_repetition": None}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "tokenizer": str(DEMO / "tokenizer"), "output_dir": "mix", "seq_length": 256, "token_budget": 2_000,
        "heldout_fraction": 0.0, "phi_model": {"path": "deid", "device": "cpu"},
        "sources": [{"name": "ehr", "paths": ["raw/ehr.jsonl"], "share": 0.5, "phi_guard": True, "filters": filters},
                    {"name": "papers", "paths": ["raw/papers.jsonl"], "share": 0.5, "filters": filters}]}))
    recipe = MixRecipe.load(recipe_path)
    # the model run here first, on torch's threads: the forked workers hung on theirs until they ran on one
    assert redact_phi("daughter zorblatt visited", model=recipe.phi_model_spec) == "daughter [NAME] visited"
    build_mix.build(recipe, workers=2)
    assert "zorblatt" not in _kept_text(recipe, "ehr") and _kept_text(recipe, "ehr").count("[NAME]") == 8
    assert _kept_text(recipe, "papers").count("zorblatt") == 8
    assert collect_ledger(recipe.out / "logs", ["ehr"])["ehr"]["phi"] == {"name": 8}
    errors = "".join(p.read_text() for p in (recipe.out / "errors").glob("*.jsonl"))
    assert "[NAME] called about" in errors and "zorblatt" not in errors
    settings = json.loads((recipe.out / "recipe.resolved.json").read_text())
    assert str((tmp_path / "deid" / "model.safetensors").resolve()) in settings["phi_model_files"]

    (tmp_path / "deid" / "model.safetensors").write_bytes((tmp_path / "deid" / "model.safetensors").read_bytes())
    with pytest.raises(BuildError, match=r"phi_model_files \(changed .*model.safetensors\) changed"):
        build_mix.build(MixRecipe.load(recipe_path))


def test_on_slurm_the_clean_stage_alone_asks_for_a_gpu_for_the_model(deid_model, tmp_path):
    """With ``phi_model`` (device auto) a Slurm build's clean-stage tasks each ask for a GPU, the other stages' for
    none; with ``device: cpu`` no stage does. Slurm is stood in for (tests/fake_slurm, its sbatch running nothing:
    the scripts are the test; test_build_mix runs a Slurm build's tasks)."""
    import os
    import subprocess
    import sys

    from preprocessing.pipeline import stage_gpus

    fake = Path(__file__).parent / "fake_slurm"
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "FAKE_SLURM_SUBMIT_ONLY": "1"}
    _write_jsonl(tmp_path / "raw" / "ehr.jsonl", [t + "\ndaughter zorblatt visited." for t in clean_notes(6, seed=43)])
    raw = {"tokenizer": str(DEMO / "tokenizer"), "output_dir": "mix", "seq_length": 256, "token_budget": 2_000,
           "heldout_fraction": 0.0, "phi_model": {"path": str(deid_model)},
           "sources": [{"name": "ehr", "paths": ["raw/ehr.jsonl"], "share": 1.0, "phi_guard": True,
                        "filters": {"min_chars": 20, "gopher_quality": None, "gopher_repetition": None}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run = subprocess.run([sys.executable, "-m", "preprocessing.build_mix", "--config", str(tmp_path / "recipe.yaml"),
                          "--executor", "slurm"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "cluster jobs submitted" in run.stdout, run.stderr[-3000:]
    scripts = {p.parent.name: p.read_text() for p in (tmp_path / "mix" / "logs").glob("*/launch_script.slurm")}
    assert len(scripts) == 8, sorted(scripts)
    gpus = {stage: [line for line in text.splitlines() if line.startswith("#SBATCH --gpus")] for stage, text in scripts.items()}
    assert gpus == {stage: ["#SBATCH --gpus=1"] if stage == "clean" else [] for stage in scripts}, gpus
    on_cpu = MixRecipe(**{**raw, "phi_model": {"path": str(deid_model), "device": "cpu"}}, base_dir=str(tmp_path))
    assert [stage_gpus(on_cpu, stage) for stage in scripts] == [0] * 8


def test_bench_phi_runs_with_a_model(deid_model, capsys):
    import torch

    from tools import bench_phi

    threads = torch.get_num_threads()
    try:
        bench_phi.main(["--notes", "4", "--clean", "3", "--holdout-notes", "0", "--model", str(deid_model),
                        "--model-device", "cpu", "--model-batch-size", "3"])
    finally:
        torch.set_num_threads(threads)  # the bench runs the model on one thread
    out = capsys.readouterr().out
    assert f"with the model {deid_model} (cpu, batch 3)" in out and "| throughput, MB/s per core" in out
