"""A labelled synthetic evaluation set for the PHI guard (seeded; every identifier is invented).

``phi_notes``: neurology notes with planted identifiers of every Safe Harbor kind the guard covers, in the
formats notes use (labelled and bare, several spellings per kind), each labelled with its kind and offsets.
``clean_notes``: clinical text without identifiers, full of what must survive: neurology eponyms, drug
names (brand and generic), scores, doses, vitals, lab, gene and antibody names, years, and upstream
placeholders (``[**Name**]``, ``___``).
Used by ``tests/test_phi.py`` and ``tools/bench_phi.py``.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from typing import NamedTuple

FIRST = ["John", "Maria", "Wei", "Aisha", "Carlos", "Emma", "Liam", "Sofia", "Noah", "Fatima", "Alice", "Kenji", "Priya",
         "Olumide", "Hannah", "Mateo", "Chloe", "Dmitri", "Ana", "Siobhan", "Yusuf", "Mei", "Rahul", "Grace", "Ibrahim",
         "Zofia", "Lucas", "Amara", "Hiroshi", "Margaret", "Robert", "Linda", "Tomás", "Ingrid", "Kwame", "Leila"]
LAST = ["Smith", "Garcia", "Wong", "Chen", "Khan", "Lopez", "Nguyen", "Okafor", "Kowalski", "Rossi", "Patel", "O'Brien",
        "Müller", "Haddad", "Novak", "Kim", "Johansson", "Fernández", "Abubakar", "Schwartz", "Martinez", "Thompson",
        "Baker", "Reyes", "Takahashi", "Ivanova", "Dubois", "Mensah", "Nakamura", "Goldberg", "Anderson", "Sullivan",
        "Castillo", "Lindqvist", "Adeyemi", "Moreau"]
CITIES = ["Springfield", "Fairview", "Worcester", "Portland", "Madison", "Georgetown", "Arlington", "Franklin", "Salem",
          "Greenville", "Bristol", "Clinton", "Riverside", "Oakland", "Dayton", "Lakewood", "Ann Arbor", "Fort Lee"]
STATES = ["IL", "MA", "OR", "WI", "TX", "VA", "TN", "NH", "SC", "CT", "NJ", "CA", "OH", "CO", "MI", "NY"]
STREETS = ["Maple Street", "Oak Ave", "Cedar Road", "Hillcrest Drive", "Lake Blvd", "Elm St", "Pine Lane", "Birch Court",
           "Willow Way", "Sunset Boulevard"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
          "December"]

# what must never be redacted
EPONYMS = ["Parkinson disease", "Alzheimer disease", "Guillain-Barré syndrome", "Babinski sign", "Broca aphasia",
           "Wernicke encephalopathy", "Huntington disease", "Horner syndrome", "Bell palsy", "Glasgow Coma Scale",
           "Wernicke-Korsakoff syndrome", "Lewy body dementia", "Marcus Gunn pupil", "Ramsay Hunt syndrome",
           "Arnold-Chiari malformation", "Arnold Chiari malformation", "Charcot-Marie-Tooth disease",
           "Creutzfeldt-Jakob disease", "Lambert-Eaton syndrome", "Miller Fisher variant", "Tourette syndrome",
           "Wallenberg syndrome", "Brown-Séquard syndrome", "Dix-Hallpike maneuver", "Epley maneuver", "Romberg sign",
           "Lhermitte sign", "Uhthoff phenomenon", "Todd paralysis", "Hoffmann sign", "Tinel sign", "Phalen test",
           "Jacksonian march", "Gowers sign", "Friedreich ataxia", "Wilson disease", "Sydenham chorea", "Adie pupil",
           "modified Rankin Scale", "Hunt and Hess grade", "circle of Willis", "Kernig sign", "Brudzinski sign",
           "Sturge-Weber syndrome", "Dandy-Walker malformation", "Meniere disease", "Argyll Robertson pupil",
           "Lou Gehrig disease"]
DRUGS = ["Keppra", "Lamictal", "Depakote", "Tegretol", "Dilantin", "Topamax", "Vimpat", "Briviact", "Sinemet", "Rytary",
         "Azilect", "Aricept", "Namenda", "Leqembi", "Ocrevus", "Tysabri", "Copaxone", "Kesimpta", "Botox", "Imitrex",
         "Nurtec", "Aimovig", "Emgality", "Ajovy", "Lyrica", "Neurontin", "Cymbalta", "Xarelto", "Eliquis", "Plavix",
         "Lipitor", "Coumadin", "Ativan", "Haldol", "Seroquel", "Zofran", "Decadron", "Solu-Medrol", "Activase",
         "TNKase", "Spinraza", "Radicava", "Austedo", "Ingrezza", "Xenazine", "Nuplazid", "Mestinon", "Firdapse",
         "Ampyra", "Tecfidera", "Gilenya", "Mavenclad", "Fycompa", "Xcopri", "Onfi", "Klonopin", "Valium", "Benadryl",
         "Tylenol", "Toradol", "Reglan", "Compazine", "Fioricet", "levetiracetam", "lamotrigine", "valproate",
         "carbamazepine", "phenytoin", "topiramate", "lacosamide", "carbidopa-levodopa", "rasagiline", "donepezil",
         "memantine", "ocrelizumab", "natalizumab", "glatiramer", "sumatriptan", "rimegepant", "erenumab", "pregabalin",
         "gabapentin", "duloxetine", "rivaroxaban", "apixaban", "clopidogrel", "atorvastatin", "warfarin", "lorazepam",
         "haloperidol", "quetiapine", "ondansetron", "dexamethasone", "methylprednisolone", "alteplase", "tenecteplase",
         "nusinersen", "edaravone", "pyridostigmine", "dalfampridine", "Levetiracetam", "Lacosamide", "Apixaban"]
PLACEHOLDERS = ["[**Name**]", "[**Last Name (NamePattern1) 1234**]", "[**Hospital1 18**]", "[**2112-3-4**]", "___"]

CLEAN = [  # {e}: an eponym, {d}/{d2}: drugs, {n}/{m}: small numbers, {y}: a year, {p}: an upstream placeholder
    "History of {e}, diagnosed in {y}.", "Exam notable for {e}.", "Findings are consistent with {e}.",
    "{e} was considered and felt to be less likely.", "Family history of {e} in a maternal uncle.",
    "Started {d} {n}00 mg BID; continue {d2}.", "{d} was increased to {n}00 mg twice daily.",
    "Patient tolerated {d} without rash.", "Switched from {d} to {d2} because of somnolence.",
    "Takes {d} as needed for breakthrough headache.", "Reports good adherence to {d} and {d2}.",
    "NIHSS {n} on arrival, {m} at 24 hours.", "Glasgow Coma Scale 1{m} (E4V5M6).", "Strength {m}/5 in the left deltoid.",
    "Reflexes 2+ and symmetric; Babinski sign absent bilaterally.", "BP 14{n}/8{m}, HR 7{n}, SpO2 9{m}% on room air.",
    "T 98.{n} F, Tmax 99 F.", "MoCA 2{m}/30 with deficits in delayed recall.", "EDSS {m}.5, stable from prior.",
    "MRI brain with and without contrast shows T2/FLAIR hyperintensities at C{n}-C{m}.", "EEG 10-20 system, {n} hours.",
    "CSF protein 4{n} mg/dL, glucose 6{m} mg/dL, {n} WBC.", "HbA1c {m}.{n}%, B12 3{n}0 pg/mL, TSH 1.{m}.",
    "Platelets 2{n}0,000; INR 1.{m}.", "Follow-up in {n}-{m} weeks with repeat imaging.", "Mild dysarthria, gait wide-based.",
    "Modified Rankin Scale {m} at discharge.", "Hunt and Hess grade {m}, Fisher grade {n}.",
    "ABCD2 score {m}; CHA2DS2-VASc {n}.", "Symptoms began in {y} and progressed over {n} years.",
    "Prior note by {p} reviewed; seen at {p} in {y}.", "Discharge date ___; follow-up with ___.",
    "Dix-Hallpike maneuver positive on the right; Epley maneuver performed.", "Romberg sign present.",
    "Lumbar puncture at L{m}-L{n} without complication.", "CT angiography showed a patent circle of Willis.",
    "Counselled on driving restrictions for {n} months.", "{n} mm aneurysm of the anterior communicating artery.",
    "Continue physical therapy {m} times weekly.", "Given {d} 1 g IV once, then {d2} {n} mg PO daily.",
    "Tremor improved on {d}; {d2} held.", "Infusion of {d} every {m} months.", "Blood cultures x{m} pending.",
    "Seen and examined by Neurology Stroke Service.", "Discussed with Neurosurgery; no acute intervention.",
    "Patient Instructions: return for new weakness.", "HISTORY OF PRESENT ILLNESS: as above.",
    "Consulted Physical Therapy and Occupational Therapy.", "PLAN: MRI in {n} months; EEG.", "Patient Education provided.",
    "Follow up in Neurology Clinic in {n} weeks.", "Transferred to the Neuro ICU on hospital day {m}.",
    "Pt Denies headache or neck stiffness.", "Spoke with Pharmacy regarding {d} dosing.", "Insurance: Medicare.",
    "Attending: Neurology Consult Service.", "Day {m} of admission; Unit 4B.", "Plan 1000 mg {d} daily.",
    "Wife at bedside; Son updated by phone.", "Contact Precautions for MRSA.", "Case discussed at Tumor Board.",
    "Per ACC/AHA {y} guidelines; MPI {y} normal.", "Discharged home to Rehab.", "Anti-MAG titer 1:{n}60.",
    "Platelets 1{n}0000, CK 1{m}50, ferritin 1{n}00.", "Patient Health Questionnaire-9 score 1{m}.",
    "Walked 100 m with a cane; 12-lead ECG normal.", "Knee extension 4/5, hip flexion 4+/5.",
    # lab, gene and antibody names and values of the shapes of ids; capitalised words after cue words
    "Anti-GAD65 and AQP4-IgG negative; MOG-IgG pending; anti-CD20 therapy planned.",
    "SMN2 copy number {m}; CYP2C19 poor metabolizer; lesion 2x{m}cm.", "Cyanocobalamin 1000mcg IM monthly.",
    "WBC 1{n}500, CA-125 normal, CA19-9 normal, PHQ9 1{m}.", "Patient Age: 6{n}.",
    "Discussed with Case Management; Pt Early mobilization.", "Patient Day {m}; Contact Isolation.",
]

PHI_TEMPLATES = [  # {slot}: an identifier (kind from SLOTS); everything else is kept text
    "Patient {full} was seen in clinic today.", "Seen by Dr. {full} in the neurology clinic.",
    "{title} {last}, {young}{sex}, presents with headache.", "Name: {caps_last_first}.", "{full} is a 67-year-old with migraine.",
    "Discussed with his daughter, {full}, at the bedside.", "Wife {first} at bedside and updated.",
    "Electronically signed by {full}, MD", "Dictated by {full}, NP.", "PCP: Dr. {last}.", "cc: {full}, MD",
    "Son {full} (health care proxy) agrees with the plan.", "Mr. {last} reports improvement.",
    "Patient: {last_first}.", "Attending: {full}.", "Emergency contact: {full} (sister), {phone}.",
    "Spoke with {first} (wife) by phone.", "Per her neurologist, {full}, no changes.", "{full}'s MRI was reviewed.",
    "Lives with partner {first}.", "Referred by {full} MD.", "Pt is Mrs. {full}.",
    "Home address: {street}, {city}, {state} {zip}.", "Lives at {street} with her husband.", "Lives in {city} with family.",
    "Originally from {city}, {state}.", "Moved to {city} last year.", "Resident of {county}.", "Mailing address {pobox}.",
    "ZIP {zip}.",
    "DOB: {date}.", "Admitted {date}.", "Seen on {md} for follow-up.", "Symptoms began {date}.", "Last seen {date}.",
    "MRI performed on {date} was unremarkable.", "Discharged {date}.", "Note time {date} 08:30.",
    "I have not seen him since {month}.", "s/p CABG x 4 in {myy}.", "{full}, M.D., pager {pager}",
    "\nGPP/{typist}\n",
    "{age}-year-old woman with falls.", "The patient is {age} yo.", "{age} y/o man with tremor.", "Age: {age}.",
    "{title} {last}, {age}{sex}, with memory loss.", "Aged {age}, lives independently.", "{age} years old.",
    "A woman in her {decade}, alert.", "A man in his late {decade}.",
    "Phone {phone}.", "Call back at {phone}.", "Fax: {phone}.", "Cell: {phone}; pager {phone}.",
    "Email {email}.", "Contact via {email}.",
    "SSN {ssn}.", "Social security number: {ssn}.", "SS# {ssn}",
    "MRN: {mrn}.", "MRN#: {mrn}", "MR# {mrn}.", "Medical Record Number {mrn}.", "Unit No: {mrn}.",
    "Hospital #: {mrn}.",
    "Health plan: {plan}.", "Member ID: {plan}.", "Medicaid ID {plan}.", "Policy # {plan}.", "Subscriber ID {plan}.",
    "Insurance ID: {plan}.",
    "Acct no. {acct}.", "Account #: {acct}.", "Billing account {acct}.", "HAR {acct}.", "FIN {acct}.",
    "DEA# {dea}.", "Medical license no. {lic}.", "Driver's license {lic}.", "License: {lic}.",
    "VIN {vin}.", "License plate {plate}.", "Plate number {plate}.",
    "Pacemaker serial no. {serial}.", "S/N: {serial}.", "Device ID {serial}.", "IMEI {imei}.", "MAC address {mac}.",
    "Patient portal: {url}", "See {url} for the family's updates.",
    "Remote access from IP {ip}.", "Logged in from {ip}.",
    "Study ID {oid}.", "Accession number {oid}.", "Specimen #{oid}.", "Case no. {oid}.", "Claim number {oid}.",
    "Ref #: {oid}.",
]

SLOT_KIND = {"full": "name", "first": "name", "last": "name", "caps_last_first": "name", "last_first": "name",
             "typist": "name", "street": "address", "pobox": "address", "city": "city", "county": "city",
             "zip": "zip", "date": "date", "md": "date", "month": "date", "myy": "date", "age": "age",
             "decade": "age", "phone": "phone", "pager": "phone", "email": "email", "ssn": "ssn", "mrn": "mrn",
             "plan": "health_plan", "acct": "account", "dea": "license", "lic": "license", "vin": "vehicle",
             "plate": "vehicle", "serial": "device", "imei": "device", "mac": "device", "url": "url", "ip": "ip",
             "oid": "other_id"}


class Note(NamedTuple):
    text: str
    labels: list[tuple[str, int, int]]  # (kind, start, end)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _upper(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1930, 2024), rng.randint(1, 12), rng.randint(1, 28)
    mon = MONTHS[m - 1]
    return rng.choice([f"{m:02d}/{d:02d}/{y}", f"{m}/{d}/{y % 100:02d}", f"{y}-{m:02d}-{d:02d}", f"{mon} {d}, {y}",
                       f"{d} {mon} {y}", f"{mon[:3]} {d}", f"{d:02d}-{mon[:3]}-{y}", f"{mon} {y}", f"{m}.{d}.{y}",
                       f"{d}{'th' if 10 < d < 14 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')} of {mon}"])


def _value(slot: str, rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    area, mid, line = rng.randint(201, 989), rng.randint(200, 999), _digits(rng, 4)
    ssn = (rng.choice([rng.randint(1, 665), rng.randint(667, 899)]), rng.randint(1, 99), rng.randint(1, 9999))
    ascii_last = unicodedata.normalize("NFKD", last).encode("ascii", "ignore").decode().lower().replace("'", "")
    return {
        "full": lambda: f"{first} {last}", "first": lambda: first, "last": lambda: last,
        "caps_last_first": lambda: f"{last.upper()}, {first.upper()}", "last_first": lambda: f"{last}, {first}",
        "street": lambda: rng.choice([f"{rng.randint(1, 9999)} {rng.choice(STREETS)}",
                                      f"{rng.randint(1, 999)} N. {rng.choice(STREETS)}, Apt {rng.randint(1, 40)}B",
                                      f"{rng.randint(1, 999)} Main St. Apt. {rng.randint(1, 40)}"]),
        "pobox": lambda: f"PO Box {rng.randint(10, 9999)}", "city": lambda: rng.choice(CITIES),
        "county": lambda: f"{rng.choice(CITIES)} County",
        "zip": lambda: rng.choice([_digits(rng, 5), f"{_digits(rng, 5)}-{_digits(rng, 4)}"]),
        "date": lambda: _date(rng), "md": lambda: f"{rng.randint(1, 12)}/{rng.randint(1, 28)}",
        "month": lambda: rng.choice(MONTHS), "myy": lambda: f"{rng.randint(1, 12)}/{rng.randint(11, 99)}",
        "pager": lambda: _digits(rng, 5), "typist": lambda: ascii_last,
        "age": lambda: str(rng.randint(90, 109)), "decade": lambda: rng.choice(["90s", "100s"]),
        "phone": lambda: rng.choice([f"({area}) {mid}-{line}", f"{area}-{mid}-{line}", f"{area}.{mid}.{line}",
                                     f"+1 {area} {mid} {line}", f"{area}{mid}{line}",
                                     f"({area}){mid}-{line}", f"{area} {mid} {line}"]),
        "email": lambda: rng.choice([f"{first[0].lower()}.{ascii_last}{rng.randint(1, 99)}@example.org",
                                     f"{first[0]}_{ascii_last}@mail.example.com"]),
        "ssn": lambda: rng.choice(["{:03d}-{:02d}-{:04d}", "{:03d} {:02d} {:04d}", "{:03d}{:02d}{:04d}"]).format(*ssn),
        "mrn": lambda: rng.choice([_digits(rng, 7), f"{_upper(rng, 1)}{_digits(rng, 7)}", f"00{_digits(rng, 6)}"]),
        "plan": lambda: rng.choice([f"HP-{_digits(rng, 8)}", f"{_digits(rng, 8)}{_upper(rng, 1)}",
                                    f"{_upper(rng, 3)}{_digits(rng, 9)}", f"W{_digits(rng, 9)}"]),
        "acct": lambda: rng.choice([_digits(rng, 8), f"{_digits(rng, 4)}-{_digits(rng, 4)}", _digits(rng, 10)]),
        "dea": lambda: f"{_upper(rng, 2)}{_digits(rng, 7)}",
        "lic": lambda: rng.choice([f"MD-{_digits(rng, 6)}", f"{_upper(rng, 1)}{_digits(rng, 7)}",
                                   f"{_digits(rng, 2)}-{_digits(rng, 4)}"]),
        "vin": lambda: "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(8)) + _digits(rng, 9),
        "plate": lambda: rng.choice([f"{rng.randint(1, 9)}{_upper(rng, 3)}{_digits(rng, 3)}",
                                     f"{_upper(rng, 3)}-{_digits(rng, 4)}"]),
        "serial": lambda: rng.choice([f"{_upper(rng, 3)}{_digits(rng, 6)}{_upper(rng, 1)}",
                                      f"{_digits(rng, 1)}{_upper(rng, 1)}{_digits(rng, 1)}{_upper(rng, 2)}{_digits(rng, 3)}",
                                      _digits(rng, 14)]),
        "imei": lambda: _digits(rng, 15),
        "mac": lambda: ":".join(f"{rng.randint(0, 255):02X}" for _ in range(6)),
        "url": lambda: rng.choice([f"https://portal.example-hospital.org/patients/{_digits(rng, 6)}",
                                   f"www.{ascii_last}familyblog.com",
                                   f"portal.example.org/patient/{_digits(rng, 6)}",
                                   f"http://mychart.example.org/chart?id={_digits(rng, 4)}"]),
        "ip": lambda: rng.choice([".".join(str(rng.randint(11, 223)) for _ in range(4)),
                                  f"2001:db8::{rng.randint(1, 0xffff):x}:{rng.randint(1, 0xffff):x}"]),
        "oid": lambda: rng.choice([f"NEURO-{_digits(rng, 4)}", f"RAD-{_digits(rng, 2)}-{_digits(rng, 6)}",
                                   f"S{_digits(rng, 2)}-{_digits(rng, 4)}", f"20{_digits(rng, 2)}-{_digits(rng, 6)}",
                                   _digits(rng, 9)]),
    }[slot]()


def _fill(template: str, rng: random.Random, labels: list, offset: int) -> str:
    """``template`` with every slot filled; identifier slots are labelled at their offsets in the note."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(template[pos:m.start()])
        slot = m.group(1)
        value = {"title": lambda: rng.choice(["Mr.", "Ms.", "Mrs."]), "young": lambda: str(rng.randint(19, 88)),
                 "sex": lambda: rng.choice("MF"), "state": lambda: rng.choice(STATES)}.get(slot, lambda: _value(slot, rng))()
        if slot in SLOT_KIND:
            start = offset + sum(map(len, out))
            labels.append((SLOT_KIND[slot], start, start + len(value)))
        out.append(value)
        pos = m.end()
    return "".join(out) + template[pos:]


class _Deck:
    """Deals every item once, in a shuffled order, before any item comes again."""

    def __init__(self, items: list[str], rng: random.Random):
        self.items, self.rng, self.left = items, rng, []

    def draw(self) -> str:
        if not self.left:
            self.left = self.rng.sample(self.items, len(self.items))
        return self.left.pop()


class _Clinical:
    """Identifier-free clinical sentences; every eponym and drug comes round in turn."""

    def __init__(self, rng: random.Random):
        self.rng, self.eponyms, self.drugs = rng, _Deck(EPONYMS, rng), _Deck(DRUGS, rng)

    def sentence(self) -> str:
        rng, template = self.rng, self.rng.choice(CLEAN)
        deal = {"e": self.eponyms.draw, "d": self.drugs.draw, "d2": self.drugs.draw}
        return template.format(**{k: draw() for k, draw in deal.items() if f"{{{k}}}" in template},
                               n=rng.randint(1, 9), m=rng.randint(1, 5), y=rng.randint(1990, 2024),
                               p=rng.choice(PLACEHOLDERS))


def phi_notes(n: int, seed: int = 0) -> list[Note]:
    """``n`` notes, each with 9 identifier sentences among 9 clinical ones; the templates are dealt in turn,
    so every format of every kind occurs about equally often."""
    rng = random.Random(seed)
    templates, clinical = _Deck(PHI_TEMPLATES, rng), _Clinical(rng)
    notes = []
    for _ in range(n):
        text, labels = "", []
        for i in range(18):
            sentence = _fill(templates.draw(), rng, labels, len(text)) if i % 2 == 0 else clinical.sentence()
            text += sentence + ("\n" if i % 4 == 3 else " ")
        notes.append(Note(text.rstrip(), labels))
    return notes


def clean_notes(n: int, seed: int = 1) -> list[str]:
    """``n`` identifier-free notes of 12-20 clinical sentences."""
    rng = random.Random(seed)
    clinical = _Clinical(rng)
    return [" ".join(clinical.sentence() for _ in range(rng.randint(12, 20))) for _ in range(n)]


# ------------------------------------------------------------------------------------------- scoring


def removed(text: str, start: int, end: int, spans) -> bool:
    """Every letter and digit of ``text[start:end]`` lies inside one of ``spans`` (start, end, ...)."""
    return all(any(s[0] <= i < s[1] for s in spans) for i in range(start, end) if text[i].isalnum())


def recall_by_kind(notes: list[Note], spans: list[list]) -> dict[str, tuple[int, int]]:
    """kind -> (identifiers removed, identifiers planted)."""
    out: dict[str, list[int]] = {}
    for note, found in zip(notes, spans):
        for kind, start, end in note.labels:
            hit = out.setdefault(kind, [0, 0])
            hit[0] += removed(note.text, start, end, found)
            hit[1] += 1
    return {k: (a, b) for k, (a, b) in sorted(out.items())}


def protected_terms_hit(texts: list[str], spans: list[list]) -> list[str]:
    """Eponyms, drug names and placeholders of ``texts`` that a span touches."""
    hit = []
    for text, found in zip(texts, spans):
        for term in EPONYMS + DRUGS + PLACEHOLDERS:
            for m in re.finditer(re.escape(term), text):
                if any(s[0] < m.end() and m.start() < s[1] for s in found):
                    hit.append(term)
    return hit
