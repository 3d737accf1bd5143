"""Generate the synthetic demo corpus under ``data/demo/`` (no real patient data; every identifier is
invented). Five sources in their real formats, with a few planted problems for the pipeline to handle:
near-duplicate notes, one abstract duplicated across sources, fake PHI in notes, a benchmark question
pasted into a web document, and one malformed JSON line. Plus chat conversations for SFT, with bad records
(no assistant turn, an unknown role, an over-long sample, malformed JSON), and small benchmark copies for
evaluating the SFT models.

    python -m preprocessing.demo_corpus [--out data/demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

COMPLAINTS = ["headache", "left-sided weakness", "slurred speech", "new-onset seizure", "dizziness", "numbness in both feet",
              "blurred vision", "memory loss", "tremor of the right hand", "neck pain radiating to the arm", "syncope",
              "double vision", "gait instability", "facial droop", "confusion", "back pain with leg weakness"]
ONSETS = ["for 2 days", "since this morning", "for three weeks", "intermittently for 6 months", "after a fall yesterday",
          "progressively over one year", "abruptly 3 hours prior to arrival", "upon waking"]
HPI = ["Denies fever or chills.", "Reports photophobia and nausea without vomiting.", "Family notes word-finding difficulty.",
       "No prior similar episodes.", "Symptoms worsen with exertion and improve with rest.", "Took ibuprofen with partial relief.",
       "Had a viral illness two weeks ago.", "Reports poor sleep and increased stress at work.", "Witnessed tonic-clonic activity lasting 2 min.",
       "Last known well at 0630.", "Denies trauma.", "Endorses tingling ascending from the toes.", "Vision loss was painless.",
       "Bystander reported the patient was briefly unresponsive.", "No bowel or bladder incontinence."]
PMH = ["hypertension", "type 2 diabetes mellitus", "atrial fibrillation", "hyperlipidemia", "migraine without aura", "CKD stage 3",
       "prior TIA", "obstructive sleep apnea", "depression", "hypothyroidism", "multiple sclerosis", "epilepsy"]
MEDS = ["lisinopril 10 mg daily", "metformin 500 mg BID", "apixaban 5 mg BID", "atorvastatin 40 mg nightly", "levetiracetam 500 mg BID",
        "sumatriptan 50 mg PRN", "levothyroxine 75 mcg daily", "sertraline 50 mg daily", "aspirin 81 mg daily", "gabapentin 300 mg TID",
        "topiramate 25 mg BID", "ocrelizumab every 6 months"]
EXAM = ["Alert and oriented x3.", "Pupils equal and reactive.", "Right pronator drift present.", "Strength 4/5 in the left arm.",
        "Decreased sensation to pinprick below the knees.", "Reflexes 2+ and symmetric.", "Babinski upgoing on the left.",
        "Finger-to-nose intact bilaterally.", "Mild dysarthria.", "Neck supple, no meningismus.", "Gait wide-based.",
        "Visual fields full to confrontation.", "Fundi without papilledema.", "Resting tremor, right greater than left."]
ASSESS = ["Acute ischemic stroke in the right MCA territory, NIHSS {n}.", "Migraine with atypical features.",
          "First unprovoked seizure.", "Peripheral neuropathy, likely diabetic.", "Idiopathic Parkinson disease, early stage.",
          "Cervical radiculopathy at C6.", "MS relapse with new optic neuritis.", "Transient ischemic attack, ABCD2 score {n}.",
          "Benign paroxysmal positional vertigo.", "Subdural hematoma, small, stable on repeat CT."]
PLANS = ["Obtain MRI brain with and without contrast.", "Start aspirin and high-intensity statin.", "EEG within 24 hours.",
         "Neurology follow-up in 2 weeks.", "Physical therapy evaluation.", "Check HbA1c, B12 and TSH.", "Admit to stroke unit.",
         "Counsel on driving restrictions.", "Begin levetiracetam 500 mg BID.", "CT angiography head and neck.",
         "Epley maneuver performed in clinic.", "Repeat CT head in 6 hours.", "Lumbar puncture if imaging negative."]
FIRST = ["John", "Maria", "Wei", "Aisha", "Carlos", "Emma", "Liam", "Sofia", "Noah", "Fatima"]
LAST = ["Smith", "Garcia", "Chen", "Khan", "Lopez", "Brown", "Novak", "Rossi", "Okafor", "Kim"]
STREETS = ["Maple Street", "Oak Avenue", "Cedar Road", "Hillcrest Drive", "Lake Boulevard"]

TOPICS = ["amyotrophic lateral sclerosis", "Alzheimer disease", "Parkinson disease", "multiple sclerosis", "epilepsy",
          "ischemic stroke", "migraine", "traumatic brain injury", "glioblastoma", "myasthenia gravis", "Guillain-Barre syndrome"]
DESIGNS = ["a randomized controlled trial", "a retrospective cohort study", "a prospective multicenter study",
           "a case-control study", "a systematic review and meta-analysis", "a cross-sectional analysis"]
OUTCOMES = ["functional independence at 90 days", "seizure freedom", "cognitive decline", "relapse rate", "mortality",
            "disability progression", "quality of life", "time to diagnosis", "hospital readmission"]
FINDINGS = ["was associated with a lower risk of", "did not significantly change", "predicted", "was independently linked to",
            "modestly improved", "showed no effect on", "substantially reduced"]
EXPOSURES = ["early rehabilitation", "intravenous thrombolysis", "a Mediterranean diet", "deep brain stimulation",
             "serum neurofilament light chain", "sleep fragmentation", "statin therapy", "anti-CD20 therapy", "ketogenic diet"]

EN_SUBJECTS = ["The old harbour", "Our local library", "The mountain village", "A small bakery", "The city council",
               "The school orchestra", "An early morning train", "The community garden", "A quiet bookshop"]
EN_VERBS = ["opened its doors again", "welcomed visitors from abroad", "celebrated its hundredth year", "changed its timetable",
            "was repainted in bright colours", "hosted a winter festival", "received a generous donation"]
EN_DETAILS = ["Residents gathered to share stories about the past.", "Children ran between the stalls while musicians played.",
              "Many people said it felt like the heart of the town.", "The weather stayed mild for most of the week.",
              "Volunteers spent months preparing every detail.", "Local newspapers covered the event on the front page.",
              "Some visitors travelled for hours to attend.", "It is now one of the most photographed places in the region.",
              "Shopkeepers reported their busiest weekend in years.", "A new bus route makes it easier to reach."]

BENCHMARK = [
    {"question": "A 67-year-old man presents with sudden right arm weakness and aphasia that began 90 minutes ago; CT of the head "
                 "shows no hemorrhage. Which of the following is the most appropriate next step in management of this patient?",
     "options": ["Intravenous alteplase", "Oral aspirin only", "Lumbar puncture", "Observation"], "answer": "Intravenous alteplase"},
    {"question": "Which antiseizure medication is associated with Stevens-Johnson syndrome in patients carrying the HLA-B*1502 allele?",
     "options": ["Carbamazepine", "Levetiracetam", "Lacosamide", "Gabapentin"], "answer": "Carbamazepine"},
]


def clinical_note(rng: random.Random, i: int, with_phi: bool) -> str:
    age, sex = rng.randint(19, 94), rng.choice(["male", "female"])
    lines = [f"CHIEF COMPLAINT: {rng.choice(COMPLAINTS)} {rng.choice(ONSETS)}.",
             f"HPI: {age}-year-old {sex} with history of {', '.join(rng.sample(PMH, rng.randint(1, 3)))} presenting with "
             f"{rng.choice(COMPLAINTS)} {rng.choice(ONSETS)}. " + " ".join(rng.sample(HPI, rng.randint(3, 5))),
             "MEDICATIONS: " + "; ".join(rng.sample(MEDS, rng.randint(2, 4))) + ".",
             f"VITALS: BP {rng.randint(100, 190)}/{rng.randint(55, 110)}, HR {rng.randint(50, 120)}, "
             f"SpO2 {rng.randint(90, 100)}% on room air, T {rng.uniform(36.1, 38.9):.1f} C.",
             "EXAM: " + " ".join(rng.sample(EXAM, rng.randint(4, 6))),
             "ASSESSMENT: " + rng.choice(ASSESS).format(n=rng.randint(1, 18)),
             "PLAN: " + " ".join(rng.sample(PLANS, rng.randint(3, 5)))]
    if with_phi:  # invented identifiers that the PHI guard must catch
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        lines.insert(0, f"Patient: {name}  MRN: {rng.randint(1000000, 9999999)}  DOB: {rng.randint(1, 12)}/{rng.randint(1, 28)}/19{rng.randint(30, 99)}")
        lines.append(f"Contact: phone ({rng.randint(200, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}, "
                     f"email {name.split()[0].lower()}.{i}@example.org, home {rng.randint(10, 9999)} {rng.choice(STREETS)}. "
                     f"SSN {rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}. "
                     f"Portal: https://portal.example-hospital.org/patients/{rng.randint(100000, 999999)}")
    return "\n".join(lines)


def abstract(rng: random.Random) -> dict:
    topic, design, outcome, exposure = rng.choice(TOPICS), rng.choice(DESIGNS), rng.choice(OUTCOMES), rng.choice(EXPOSURES)
    n = rng.randint(40, 12000)
    text = (f"BACKGROUND: Whether {exposure} influences {outcome} in {topic} remains uncertain. "
            f"METHODS: We conducted {design} including {n} participants with {topic} followed for a median of "
            f"{rng.randint(6, 60)} months. The primary outcome was {outcome}; secondary outcomes included "
            f"{rng.choice(OUTCOMES)} and {rng.choice(OUTCOMES)}. "
            f"RESULTS: {exposure.capitalize()} {rng.choice(FINDINGS)} {outcome} (hazard ratio {rng.uniform(0.4, 1.6):.2f}, "
            f"95% CI {rng.uniform(0.2, 0.9):.2f} to {rng.uniform(1.0, 2.4):.2f}). Adverse events occurred in "
            f"{rng.randint(1, 30)}% of participants. "
            f"CONCLUSIONS: In patients with {topic}, {exposure} {rng.choice(FINDINGS)} {outcome}. Larger trials are warranted.")
    return {"pmid": str(rng.randint(30000000, 39999999)), "title": f"{exposure.capitalize()} and {outcome} in {topic}", "text": text}


def latex_paper(rng: random.Random, i: int) -> str:
    topic = rng.choice(TOPICS)
    sentences = [
        lambda: f"Population activity was recorded with {rng.choice(['two-photon imaging', 'Neuropixels probes', 'high-density EEG', 'fMRI'])} in {rng.randint(3, 40)} subjects \\cite{{ref{rng.randint(1, 40)}}}.",
        lambda: f"The firing rate $r_i(t)$ of unit $i$ follows $\\tau \\frac{{dr_i}}{{dt}} = -r_i + \\phi(\\sum_j W_{{ij}} r_j + I_i)$ with $\\tau = {rng.randint(5, 50)}$ ms.",
        lambda: f"As shown in Figure~\\ref{{fig:{rng.randint(1, 5)}}}, {rng.choice(EXPOSURES)} {rng.choice(FINDINGS)} {rng.choice(['gamma', 'theta', 'beta', 'alpha'])} power (\\emph{{p}} $<$ 0.0{rng.randint(1, 5)}).",
        lambda: f"We fit a {rng.choice(['generalized linear model', 'latent dynamical system', 'hidden Markov model', 'Gaussian process'])} to trial-averaged responses and held out {rng.randint(10, 30)}\\% of trials.",
        lambda: f"Connectivity was estimated from {rng.choice(['cross-correlograms', 'Granger causality', 'transfer entropy', 'coherence'])} and thresholded at $z > {rng.uniform(1.5, 3.5):.1f}$.",
        lambda: f"Lesions of the {rng.choice(['hippocampus', 'thalamus', 'basal ganglia', 'prefrontal cortex', 'cerebellum'])} abolished the effect in {rng.randint(60, 100)}\\% of sessions.",
        lambda: f"The spectral radius of $W$ was kept below ${rng.uniform(0.8, 1.2):.2f}$ so that activity {rng.choice(['remained stable', 'approached criticality', 'showed slow oscillations'])}.",
        lambda: f"Decoding accuracy reached {rng.randint(55, 97)}\\% using {rng.randint(20, 400)} simultaneously recorded neurons.",
    ]
    paras = [" ".join(f() for f in rng.sample(sentences, 4)) for _ in range(rng.randint(6, 9))]
    return "\n".join([
        "\\documentclass{article}", "\\usepackage{amsmath}",
        f"\\title{{Recurrent dynamics of cortical circuits in {topic}: study {i}}}", "\\begin{document}", "\\maketitle",
        "\\begin{abstract}", f"We study how network structure shapes activity in {topic} using {rng.choice(DESIGNS)} and a rate model.",
        "\\end{abstract}", "\\section{Introduction}", paras[0], "\\section{Methods}",
        "\\begin{equation}\\label{eq:rate}", "\\tau \\dot{r} = -r + \\phi(W r + I)", "\\end{equation}",
        "\\begin{itemize}", f"\\item Recordings from {rng.randint(3, 40)} animals.", "\\item Spike sorting with Kilosort.", "\\end{itemize}",
        *paras[1:], "\\section{Discussion}", f"Our results suggest testable predictions for {topic} \\cite{{ref{rng.randint(1, 40)}}}.",
        "\\begin{thebibliography}{9}", "\\bibitem{ref1} A. Author, J. Neurosci. 12 (2020).", "\\end{thebibliography}",
        "\\end{document}"])


def english_doc(rng: random.Random) -> str:
    return " ".join([f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} this {rng.choice(['spring', 'summer', 'autumn', 'winter'])}."]
                    + rng.sample(EN_DETAILS, rng.randint(5, 8)))


# SFT: (condition, key finding, first step, why) for question-answer conversations with reasoning
CASES = [("acute ischemic stroke", "sudden focal weakness with a last known well under 4.5 hours",
          "non-contrast CT of the head, then thrombolysis if there is no bleed", "time is brain tissue"),
         ("first unprovoked seizure", "a witnessed tonic-clonic event with full recovery", "EEG and MRI of the brain",
          "they show the risk of a second seizure"),
         ("bacterial meningitis", "fever, neck stiffness and confusion", "blood cultures and empiric antibiotics without delay",
          "each hour of delay raises mortality"),
         ("Guillain-Barre syndrome", "ascending weakness with lost reflexes after an infection",
          "lumbar puncture and forced vital capacity checks", "respiratory failure can come quickly"),
         ("myasthenia gravis", "fatigable ptosis and double vision", "acetylcholine receptor antibodies",
          "they confirm the diagnosis in most patients"),
         ("Parkinson disease", "resting tremor, rigidity and slowness", "a levodopa trial",
          "a clear response supports the diagnosis"),
         ("multiple sclerosis relapse", "new optic neuritis in a known patient", "MRI with contrast and high-dose steroids",
          "steroids speed recovery from the relapse"),
         ("subarachnoid hemorrhage", "a thunderclap headache", "CT of the head and, if negative, lumbar puncture",
          "a missed bleed can be fatal"),
         ("migraine", "throbbing one-sided headache with photophobia", "a triptan early in the attack",
          "early treatment works best"),
         ("peripheral neuropathy", "numbness in both feet in a patient with diabetes", "glucose control and foot care",
          "they slow progression and prevent ulcers")]


def sft_conversation(rng: random.Random, i: int) -> dict:
    """One chat: a question about a case, answered with (sometimes) reasoning in <think>; some multi-turn."""
    condition, finding, step, why = rng.choice(CASES)
    question = f"A patient has {finding}. What is the most likely diagnosis and the first step?"
    answer = f"The most likely diagnosis is {condition}. The first step is {step}."
    reasoning = f"<think>\n{finding.capitalize()} points to {condition}. The first step matters because {why}.\n</think>\n\n"
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": (reasoning if i % 2 == 0 else "") + answer}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "You are a careful neurology assistant."})
    if i % 4 == 0:
        messages += [{"role": "user", "content": "Why is that step first?"},
                     {"role": "assistant", "content": f"Because {why}."}]
    return {"id": f"chat-{i:04d}", "messages": messages}


def sft_corpus(out: Path, seed: int) -> None:
    """``sft/conversations.jsonl``: 240 chats and six bad records for the SFT step to quarantine."""
    rng = random.Random(seed + 1)
    lines = [json.dumps(sft_conversation(rng, i)) for i in range(240)]
    bad = [{"id": "bad-no-assistant", "messages": [{"role": "user", "content": "Is anyone there?"}]},
           {"id": "bad-role", "messages": [{"role": "doctor", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
           {"id": "bad-too-long", "messages": [{"role": "user", "content": "Summarise. " + "The patient was seen. " * 400},
                                               {"role": "assistant", "content": "Seen."}]},
           {"id": "bad-no-messages", "text": "plain text is not a conversation"},
           {"id": "bad-content", "messages": [{"role": "user", "content": ["not", "a", "string"]}]}]
    for k, record in enumerate(bad):
        lines.insert(20 * (k + 1), json.dumps(record))
    lines.insert(130, '{"id": "bad-json", "messages": [')
    (out / "sft").mkdir(parents=True, exist_ok=True)
    (out / "sft" / "conversations.jsonl").write_text("\n".join(lines) + "\n")


def eval_sets(out: Path, seed: int) -> None:
    """``eval/``: small local benchmark copies for the demo's evaluation of the SFT arms: PubMedQA in the
    bigbio/pubmed_qa layout lm-eval reads (``eval/pubmedqa/{test,train}.jsonl``) and MedQA-style questions for
    the judge (``eval/medqa.jsonl``), worded unlike the SFT conversations."""
    rng = random.Random(seed + 2)
    (out / "eval" / "pubmedqa").mkdir(parents=True, exist_ok=True)
    for split, n in (("test", 20), ("train", 3)):  # train feeds lm-eval's few-shot examples
        rows = []
        for i in range(n):
            exposure, outcome, topic = rng.choice(EXPOSURES), rng.choice(OUTCOMES), rng.choice(TOPICS)
            decision = rng.choice(["yes", "no", "maybe"])
            rows.append({"QUESTION": f"Does {exposure} change {outcome} in {topic}?",
                         "CONTEXTS": [f"{rng.choice(DESIGNS).capitalize()} of {rng.randint(40, 900)} patients with {topic} "
                                      f"examined {exposure}.", f"It {rng.choice(FINDINGS)} {outcome}."],
                         "LABELS": ["METHODS", "RESULTS"], "MESHES": [], "YEAR": "2024", "reasoning_required_pred": decision,
                         "reasoning_free_pred": decision, "final_decision": decision, "LONG_ANSWER": "See the results."})
        (out / "eval" / "pubmedqa" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = []
    for i, (condition, finding, step, why) in enumerate(CASES):
        wrong = rng.sample([c[2] for c in CASES if c[0] != condition], 3)
        options = dict(zip("ABCD", rng.sample([step, *wrong], 4)))
        answer = next(k for k, v in options.items() if v == step)
        questions.append({"id": f"demo-medqa-{i}", "question": f"In suspected {condition}, which first step is most appropriate?",
                          "options": options, "answer": step, "answer_idx": answer})
    (out / "eval" / "medqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))


def generate(out: Path, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    for sub in ("ehr", "arxiv", "pubmed", "med", "en", "benchmarks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    notes = [{"id": f"note-{i:04d}", "text": clinical_note(rng, i, with_phi=i % 5 == 0)} for i in range(240)]
    # planted near-duplicates: a copied note with one sentence edited
    for j in range(4):
        src = notes[10 + j]
        notes.append({"id": f"note-dup-{j}", "text": src["text"].replace("PLAN:", "PLAN: Discussed with attending.")})
    for k, part in enumerate((notes[:130], notes[130:])):
        lines = [json.dumps(n) for n in part]
        if k == 1:
            lines.insert(7, '{"id": "note-broken", "text": "Truncated export')  # malformed line, quarantined
        (out / "ehr" / f"notes_{k}.jsonl").write_text("\n".join(lines) + "\n")

    abstracts = [abstract(rng) for _ in range(150)]
    with gzip.GzipFile(out / "pubmed" / "abstracts.jsonl.gz", "wb", mtime=0) as f:  # byte-identical reruns
        f.write("".join(json.dumps(a) + "\n" for a in abstracts).encode())

    med = [{"doc_id": f"med-{i}", "text": " ".join(abstract(rng)["text"] for _ in range(2))} for i in range(100)]
    med.append({"doc_id": "med-crosspost", "text": abstracts[3]["text"]})  # exact duplicate of a PubMed abstract
    pq.write_table(pa.Table.from_pylist(med), out / "med" / "general_medical.parquet")

    en = [{"text": english_doc(rng)} for _ in range(60)]
    en.append({"text": "Quiz night at the library was a success. One of the questions read: " + BENCHMARK[0]["question"]
               + " Most teams answered " + BENCHMARK[0]["answer"] + "."})  # contamination
    (out / "en" / "web.jsonl").write_text("".join(json.dumps(d) + "\n" for d in en))

    for i in range(12):
        (out / "arxiv" / f"paper_{i:02d}.tex").write_text(latex_paper(rng, i))
    (out / "benchmarks" / "medqa_sample.jsonl").write_text("".join(json.dumps(b) + "\n" for b in BENCHMARK))

    # the demo's tokenizer: a real BPE trained on this corpus (stands in for the Qwen3.5 tokenizer)
    from tools.tiny_qwen35 import write_tokenizer

    texts = [n["text"] for n in notes] + [a["text"] for a in abstracts] + [d["text"] for d in en]
    write_tokenizer(out / "tokenizer", vocab_size=2048, texts=texts)
    sft_corpus(out, seed)
    eval_sets(out, seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/demo"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    generate(args.out, args.seed)
    print(f"wrote demo corpus to {args.out}")


if __name__ == "__main__":
    main()
