"""PHI detection for the guard on EHR sources: every HIPAA Safe Harbor identifier kind that can occur in note text.

Built on Microsoft Presidio (``presidio-analyzer``): its recognizers find e-mails, phone and fax numbers
(Google's libphonenumber), SSNs (with the SSA's validity rules), URLs, IP and MAC addresses, numeric dates,
credit-card, bank, IBAN, DEA, NPI, Medicare (MBI), passport, claim and prescription numbers, each scored and
raised by context words near it. What Presidio leaves to an NER model (names, places) or does not cover
(MRNs, labelled account/plan/licence/device ids, ZIP codes, ages over 89, VINs, month-name dates) is added
here as Presidio recognizers, among them the unlabelled id formats of philter-lite's rules (philter-lite is
the maintained fork of UCSF's clinical de-identifier Philter). Person names come from the first/last-name
lists and the common-word list that philter-lite ships, widened by the first and last names of Faker's 80-odd
locales (philter-lite's lists lack, for one, "Ana", which they hold as the antibody test ANA). Left out: Presidio's
driver-licence and insurance-member recognizers, whose weak patterns raised by a context word anywhere in
the five words before flag clinical scores ("T2", "ABCD2") after an "Insurance: Medicare." line; the
labelled recognizers here cover those ids.

Why not philter-lite's own engine: its ``detect_phi`` part-of-speech-tags every note with NLTK's perceptron
tagger, whose data comes only from the NLTK downloader (not from PyPI), and nothing may be downloaded at run
time. Why not a Presidio NER model: spaCy's English models are not on PyPI under official names, and
general-domain NER misses the terse name formats of notes. So Presidio runs here on a blank spaCy English
tokenizer (no model), which is all its context scoring needs. A de-identification model the user has (trained on
annotated notes, a local folder: the recipe's ``phi_model``) runs beside the rules as Presidio's
``HuggingFaceNerRecognizer`` (:func:`_model_recognizer`).

Kept as they are: neurology eponyms (``EPONYMS``; "Parkinson", "Guillain-Barré", "Glasgow Coma Scale"), also where
the model tags them; drug names (philter-lite's common-word list has them); upstream de-identification placeholders
(``[**Name**]``, ``___``).
"""

from __future__ import annotations

import datetime
import functools
import unicodedata
from collections import Counter
from typing import NamedTuple

import regex

KINDS = ("name", "address", "city", "zip", "date", "age", "phone", "email", "ssn", "mrn", "health_plan", "account",
         "license", "vehicle", "device", "url", "ip", "other_id")

# Presidio's entity names -> our kinds (our own recognizers name their entity after the kind)
_PRESIDIO_KIND = {
    "PERSON": "name", "EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "US_SSN": "ssn", "US_ITIN": "ssn",
    "URL": "url", "IP_ADDRESS": "ip", "DATE_TIME": "date", "MEDICAL_LICENSE": "license", "US_NPI": "license",
    "US_BANK_NUMBER": "account", "CREDIT_CARD": "account", "IBAN_CODE": "account", "US_MBI": "health_plan",
    "MAC_ADDRESS": "device", "UUID": "other_id", "US_PASSPORT": "other_id", "US_CLAIM_NUMBER": "other_id",
    "US_PRIOR_AUTHORIZATION_NUMBER": "other_id", "US_PRESCRIPTION_NUMBER": "other_id", "US_REFERRAL_NUMBER": "other_id",
}

# Eponyms of neurology (and their co-eponyms) that are also in the name lists: never a person in a note.
EPONYMS = frozenset("""
adie alzheimer argyll arnold babinski barre bell broca brown brudzinski charcot chiari creutzfeldt dandy dix eaton
epley fisher friedreich gehrig gowers gunn guillain hallpike hess hoffmann horner hunt huntington jackson jakob kennedy kernig
korsakoff lambert lewy lhermitte marcus marie martin meniere miller parkinson phalen ramsay rankin rinne robertson
romberg sequard spetzler sturge sydenham tinel todd tourette uhthoff walker wallenberg weber wernicke willis wilson
glasgow
""".split())

SCORE_THRESHOLD = 0.4  # Presidio's floor for a weak pattern raised by a context word
PIECE_CHARS = 4_000  # analysed at once: Presidio's context scoring is quadratic in a text's length
PIECE_OVERLAP = 400  # characters a piece repeats of the one before: a label there ("MRN:") still raises what follows

_PLACEHOLDER = regex.compile(r"\[\*\*.*?\*\*\]")  # MIMIC-style upstream de-identification


class Span(NamedTuple):
    start: int
    end: int
    kind: str


class PHIModel(NamedTuple):
    """A de-identification model that runs beside the rules (the recipe's ``phi_model:``): a local transformers
    token-classification checkpoint, its labels mapped to kinds (:func:`model_labels`), and its device (None: a
    GPU where there is one, :func:`model_device`)."""
    path: str
    labels: tuple[tuple[str, str | None], ...]
    device: str | None = None
    batch_size: int | None = None  # chunks a forward pass takes (None: :func:`model_batch_size`)


class PHIModelError(RuntimeError):
    """The de-identification model failed on a text: the guard stops rather than pass the text unread."""


# ------------------------------------------------------------------------------------------- names

# Smith, O'Brien, Müller, SMITH, Smith-Jones; not the letters of a gene, "PSEN1", that ends a cued name's line
_WORD = r"\p{Lu}[\p{L}'’]*\p{L}(?:-\p{Lu}[\p{L}'’]*\p{L})?(?![\p{L}\d])"
_NAME_WORD = regex.compile(_WORD)
# a surname's particles, which the name lists hold as words of their own ("de la Cruz", "van der Berg", "ben David")
_PARTICLE = r"(?i:van|von|der|den|de|del|della|di|da|dos|du|la|le|ben|bin|ibn|ter|ten)"
_INITIAL = r"\p{Lu}\.?"
_TITLED = regex.compile(rf"\b(?:Dr|Drs|Mr|Mrs|Ms|Mx|Miss|Prof|Doctor|DR\.)\.?[ \t]+\K(?:{_INITIAL}[ \t]+)?(?:{_PARTICLE}[ \t]+)*{_WORD}"
                        rf"(?:[ \t]+(?:{_INITIAL}[ \t]+)?{_WORD})?")
_ROLES = ("patient|pt|name|patient name|seen by|seen with|examined by|evaluated by|referred by|discussed with|d/w|"
          "spoke with|spoke to|signed by|dictated by|transcribed by|cosigned by|attending|resident|fellow|intern|"
          "pcp|provider|physician|surgeon|neurologist|nurse|rn|np|wife|husband|spouse|partner|son|daughter|mother|"
          "father|sister|brother|grandson|granddaughter|niece|nephew|aunt|uncle|friend|neighbor|neighbour|"
          "caregiver|guardian|hcp|poa|proxy|contact|cc|"
          # who wrote, was reached or is called: "Note written by", "Case reviewed with", "Msg left for", 'Goes by "Pepe"'
          "written by|authored by|note by|reviewed with|reviewed by|left for|message for|goes by|known as|aka|saw")
# (not "interpreter": a language follows it far more often than a name, "Interpreter: Spanish")
_CUE_GAP = r"\s*[:,(\"“']?\s*"  # "Name: Smith", "Daughter (Ana)", 'goes by "Bubba"'
# a cued name in capitals, or in lower case ("pt hamid rahimi", "Daughter (radhika)"; NameRecognizer._lower_runs decides
# which lower-case words are a name), in one pass over the text; a lower-case run stops before a cue ("pt wife Maria")
_LOWER_WORD = r"\p{Ll}[\p{Ll}'’]*\p{Ll}(?:-\p{Ll}+)?"
_NO_CUE = rf"(?!(?i:{_ROLES})\b)"
_CUED = regex.compile(rf"(?<![\p{{L}}/])(?i:{_ROLES})\b{_CUE_GAP}\K(?:{_WORD}(?:,?[ \t]+(?:{_INITIAL}[ \t]+)?{_WORD}){{0,2}}|"
                      rf"{_NO_CUE}{_LOWER_WORD}(?:[ \t]+{_NO_CUE}{_LOWER_WORD}){{0,2}})")
_LOWER_NAME_WORD = regex.compile(_LOWER_WORD)
# clinical services and specialists are no names ("cc Neurohospitalist", "Discussed with Neuro-Ophthalmology")
_SPECIALTY = regex.compile(r"(?:olog(?:y|ies|ist|ists)|iatr(?:y|ist|ists)|icians?|hospitalists?|therap(?:y|ies|ist|ists)|"
                           r"surgery|medicine)$")
_ROLE_WORDS = frozenset(regex.findall(r"[a-z]+", _ROLES)) - {"saw"}  # a cue is never the name it announces ("Son", "Nurse")
_PAIR_WORD = regex.compile(rf"(?<![\p{{L}}\d]){_WORD}")  # a whole word: not "SpO" of "SpO2"
_GAP_FIRST_LAST = regex.compile(r"[ \t]+(?:\p{Lu}\.?[ \t]+)?")
_GAP_LAST_FIRST = regex.compile(r",[ \t]*")
# after a pair, the disease or sign it names: a place or a person of long ago ("Rocky Mountain spotted fever")
_NAMES_A_DISEASE = regex.compile(r"[ \t]+(?:spotted[ \t]+)?(?i:fever|syndrome|disease|sign|palsy|phenomenon|virus|encephalitis)\b")
_CREDENTIAL = (r"MD|M\.D\.|DO|D\.O\.|RN|NP|PA-C|PA|PhD|Ph\.D\.|APRN|CNP|CRNP|DNP|FNP|MSW|LCSW|LICSW|PharmD|RPh|DPT|OTR|LPN|"
               r"PGY-?\d")
_CREDENTIALED = regex.compile(rf"{_WORD}(?:,?[ \t]+(?:{_INITIAL}[ \t]+)?{_WORD}){{0,2}}(?=,?[ \t]+(?:{_CREDENTIAL})(?!\p{{L}}))")
_CREDENTIAL_WORD = regex.compile(rf"(?:{_CREDENTIAL}|PGY)")  # never a name word of a cued run ("Ana Todd, PGY-2")
# a name before what notes say of a person: "Tamanko family requests", "Faith Bell presented", "Jackson, Rangi C. is a
# 67-year-old" (a family that does what people do: not a "family history", "Rho family GTPases")
_PERSON_AFTER = (r"family[ \t]+(?:requests?|wish(?:es)?|wants?|asks?|declines?|agrees?|prefers?|states?|reports?|is|was|are|"
                 r"were|has|have|at\b|present|meeting|members?[ \t]+(?:at|present)|notified|updated|aware|visited)\b|"
                 r"presented\b|presents\b|is[ \t]+an?[ \t]+\d{1,3}[- ]?(?:year|yo\b|y/?o\b)")
# kinds of family, not its name: "Foster family present" ("Foster" is a listed surname too)
_FAMILY_KIND = r"(?i:foster|adoptive|birth|biological|host|step|extended|immediate|nuclear|whole|entire)[ \t]+family\b"
_NAMED_BEFORE = regex.compile(rf"(?!{_FAMILY_KIND}){_WORD}(?:,?[ \t]+(?:{_INITIAL}[ \t]+)?{_WORD}){{0,2}}(?:[ \t]+\p{{Lu}}\.)?"
                              rf"(?=,?[ \t]+(?:{_PERSON_AFTER}))")
_LOWER_NAMED_BEFORE = regex.compile(rf"(?<![\p{{L}}\d]){_LOWER_WORD}(?:[ \t]+{_LOWER_WORD}){{0,2}}(?=[ \t]+(?:{_PERSON_AFTER}))")
_UNITS_OF_CARE = r"ICU|[MSNPC]ICU|CVICU|NSICU|CCU|PACU|ED|ER|OR|IR|EMS|ICN"  # "RN ICU notified": no nurse's initials
_CUE_AFTER = (_CREDENTIALED, _NAMED_BEFORE)  # the cue follows the name: its words are read back from the cue


def _faker_names() -> tuple[Counter, set[str]]:
    """First names of every locale of Faker's person provider (census and registry lists), as keys with the
    number of locales listing each, and its last names."""
    import importlib
    import pkgutil

    import faker.providers.person as person

    first, last = Counter(), set()
    for locale in pkgutil.iter_modules(person.__path__):
        provider = importlib.import_module(f"{person.__name__}.{locale.name}").Provider
        names: tuple[set[str], set[str]] = set(), set()
        for i, part in enumerate(("first_names", "last_names")):
            for attr in (part, f"{part}_male", f"{part}_female", f"{part}_nonbinary"):
                values = getattr(provider, attr, ())  # a tuple, or a dict of name -> weight; not a property
                if isinstance(values, (tuple, list, dict)):
                    names[i].update(k for k in map(_key, filter(lambda v: isinstance(v, str), values)) if len(k) > 1)
        first.update(names[0])
        last |= names[1]
    return first, last


def _key(word: str) -> str:
    """The lists' spelling: lower case, no accent, no possessive, no apostrophe (O'Brien's -> obrien)."""
    word = word.lower().replace("’", "'").removesuffix("'s").replace("'", "")
    word = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()
    return word if word.replace("-", "").isalpha() else ""


def _eponym(key: str) -> bool:
    return any(part in EPONYMS for part in key.split("-"))  # "guillain-barre"


_TRAILING_INITIAL = regex.compile(r"[ \t]+\p{Lu}\.")
_PARTICLES_THEN_WORD = regex.compile(  # not "de novo"
    rf"(?:[ \t]+{_PARTICLE})+[ \t]+(?!(?i:novo|facto)\b)\p{{L}}[\p{{L}}'’-]*\p{{L}}(?![\p{{L}}\d])")
_PARTICLES_BEFORE = regex.compile(rf"(?<![\p{{L}}\d]){_PARTICLE}(?:[ \t]+{_PARTICLE})*[ \t]+$")


def _with_particles(text: str, start: int, end: int) -> tuple[int, int]:
    """A found name with the particles around it and the surname after them: "agnieszka de la cruz" of "agnieszka",
    "van der Berg" of "Berg"."""
    after = _PARTICLES_THEN_WORD.match(text, end)
    before = _PARTICLES_BEFORE.search(text, max(0, start - 40), start)
    return (before.start() if before else start), (after.end() if after else end)


def _with_initial(text: str, start: int, end: int) -> int:
    """``end`` moved past a middle initial that follows a "Last, First" name ("Ochieng, Radhika C."), the order of
    an EHR's patient header; the initial is part of the name."""
    m = _TRAILING_INITIAL.match(text, end)
    return m.end() if m and "," in text[start:end] else end


def _name_recognizer():
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class NameRecognizer(EntityRecognizer):
        """Person names: after a title (Dr., Ms.), after a role or relation (patient, seen by, wife), before
        a credential (", MD"), or two name words in a row ("John A. Smith", "Smith, John") where one of them
        is surely a name (listed and no common word) and the other a listed name, or a capitalised word of no
        list after a sure first name ("Kenji Lindqvist"); never an eponym pair such as "Marcus Gunn". A word
        of philter-lite's common-word list (English and medical words, drug names) is a name only where
        philter-lite also lists it as one, or where it is a first name in three or more of Faker's locales
        and not written in capitals ("Ana", not the antibody test "ANA")."""

        def __init__(self):
            super().__init__(supported_entities=["PERSON"], name="NameRecognizer")

        def load(self) -> None:
            from philter_lite.filters.filter_db import set_db

            first, last = set(set_db["firstnames"]), set(set_db["lastnames"])
            self.common = frozenset(set_db["nonames"])
            more_first, more_last = _faker_names()
            # Faker adds names but no common word, except those that philter-lite lists as no name while three
            # or more of Faker's locales give them as first names ("ana"; not "age", "case" or "day", which one
            # locale or a surname list has)
            self.title_only = {k for k, n in more_first.items() if n >= 3} & (self.common - first - last)
            other_common = self.common - self.title_only
            self.first = (first | (more_first.keys() - other_common)) - _ROLE_WORDS
            self.last = (last | (more_last - other_common)) - _ROLE_WORDS

        def analyze(self, text, entities, nlp_artifacts=None):
            cued = list(_CUED.finditer(text))
            spans = [*self._runs(_TITLED, text, 0.85), *self._runs(_CUED, text, 0.7, [m for m in cued if m.group()[0].isupper()]),
                     *self._lower_runs(text, [m for m in cued if not m.group()[0].isupper()]),
                     *self._lower_runs(text, _LOWER_NAMED_BEFORE.finditer(text), backward=True),
                     *self._runs(_CREDENTIALED, text, 0.85), *self._runs(_NAMED_BEFORE, text, 0.7), *self._pairs(text)]
            return [RecognizerResult("PERSON", *_with_particles(text, s, e), score) for s, e, score in spans]

        def _could_be_name(self, word: str, key: str) -> bool:
            if _SPECIALTY.search(key):
                return False
            if key in self.title_only:
                return not word.isupper()
            return key in self.first or key in self.last or key not in self.common

        def _given(self, word: str, key: str, sure: bool) -> bool:
            return key in self.first and (key not in self.common if sure else self._could_be_name(word, key))

        def _family(self, word: str, key: str, sure: bool) -> bool:
            return key in self.last and (key not in self.common if sure else self._could_be_name(word, key))

        def _abbreviation_after(self, before: str, word: str, key: str) -> bool:
            """A word in capitals after one that is not, and in no name list: the gene or abbreviation that follows
            a name on its line ("fellow: Mirola N. Mwangi MAPT positive"), not its last word ("Jean DUPONT")."""
            return word.isupper() and not before.isupper() and key not in self.first and key not in self.last

        def _runs(self, pattern, text: str, score: float, matches=None):
            """Per match, its words that could be a name (a common word too where it stands next to an
            unambiguous surname: "Son Ana Reyes"): from the start (after a title, the first word is always
            one), or for a cue after the name (a credential, "presented") the words right before it; a third word
            that is an eponym starts the next phrase."""
            for m in pattern.finditer(text) if matches is None else matches:
                words = list(_NAME_WORD.finditer(m.group()))
                keys = [_key(w.group()) for w in words]
                surname = [self._family(w.group(), k, sure=True) for w, k in zip(words, keys)]
                beside_surname = [any(surname[max(i - 1, 0):i + 2]) for i in range(len(words))]
                could = [self._could_be_name(w.group(), k) for w, k in zip(words, keys)]
                if pattern is _NAMED_BEFORE:  # a weaker cue: no common word ("He", "Glasgow Coma Scale") but beside a surname
                    ok = [c and k not in self.common or s for c, k, s in zip(could, keys, beside_surname)]
                else:
                    ok = [(pattern is _TITLED and i == 0) or c or s for i, (c, s) in enumerate(zip(could, beside_surname))]
                ok = [o and not _CREDENTIAL_WORD.fullmatch(w.group()) for o, w in zip(ok, words)]
                if len(ok) == 3 and keys[2] in EPONYMS:  # "Attending: Zofia Dubois Horner syndrome"
                    ok[2] = False
                if pattern in _CUE_AFTER:
                    words, ok, keys = words[::-1], ok[::-1], keys[::-1]
                else:
                    ok = [o and not (i and self._abbreviation_after(words[i - 1].group(), w.group(), keys[i]))
                          for i, (o, w) in enumerate(zip(ok, words))]
                n = ok.index(False) if False in ok else len(ok)
                # one word alone before its cue is a surname ("Okafor, MD"), not a common word that is only a first
                # name elsewhere ("Per RN report")
                if n == 1 and pattern in _CUE_AFTER and keys[0] in self.common and keys[0] not in self.last:
                    n = 0
                if n:
                    first, last = (words[n - 1], words[0]) if pattern in _CUE_AFTER else (words[0], words[n - 1])
                    # after a title, from the match's start: its initial and particles too ("Dr. J. Smith")
                    start, end = m.start() + (0 if pattern is _TITLED else first.start()), m.start() + last.end()
                    yield start, _with_initial(text, start, end), score

        def _lower_runs(self, text: str, matches, backward: bool = False):
            """A cued name in lower case: its first word a listed first or last name that is no common word, no
            eponym and no cue ("pt maria", not "pt denies" or "son was"), then the words after it that are no common
            word; in brackets of its own after the cue, a listed name is not needed ("Daughter (nyrith)"). ``backward``:
            the cue follows ("hamid rahimi presented"), the name is the words before it that are no common word, from
            the first of them that is a listed name."""
            for m in matches:
                words = list(_LOWER_NAME_WORD.finditer(m.group()))
                keys = [_key(w.group()) for w in words]
                plain = [k and k not in self.common and not _eponym(k) and k not in _ROLE_WORDS for k in keys]
                listed = [k in self.first or k in self.last for k in keys]
                if backward:
                    start = len(words)
                    while start and plain[start - 1]:
                        start -= 1
                    start = next((i for i in range(start, len(words)) if listed[i]), len(words))
                    run = words[start:]
                else:
                    n = next((i for i, ok in enumerate(plain) if not ok), len(words))
                    end = m.start() + words[n - 1].end() if n else m.start()
                    bracketed = n and text[m.start() - 1:m.start()] == "(" and text[end:end + 1] == ")"
                    run = words[:n] if listed[:1] == [True] or bracketed else []
                if run:
                    yield m.start() + run[0].start(), m.start() + run[-1].end(), 0.6

        def _pairs(self, text: str):
            """A first then a last name ("John A. Smith", "Ana Patel", "Kenji Lindqvist"), or "Smith, John"."""
            words = list(_PAIR_WORD.finditer(text))
            keys = [_key(w.group()) for w in words]
            for i in range(len(words) - 1):
                (a, ka), (b, kb) = (words[i].group(), keys[i]), (words[i + 1].group(), keys[i + 1])
                if (not ka or not kb or _eponym(ka) or _eponym(kb) or self._abbreviation_after(a, b, kb)
                        or _NAMES_A_DISEASE.match(text, words[i + 1].end())):
                    continue
                gap = text[words[i].end():words[i + 1].start()]
                unknown = kb not in self.common and kb not in self.first and kb not in self.last
                forward = _GAP_FIRST_LAST.fullmatch(gap) and (
                    (self._given(a, ka, sure=True) and (self._family(b, kb, sure=False) or unknown))
                    or (self._given(a, ka, sure=False) and self._family(b, kb, sure=True)))
                backward = _GAP_LAST_FIRST.fullmatch(gap) and (
                    (self._family(a, ka, sure=True) and self._given(b, kb, sure=False))
                    or (self._family(a, ka, sure=False) and self._given(b, kb, sure=True)))
                if forward or backward:
                    yield words[i].start(), _with_initial(text, words[i].start(), words[i + 1].end()), 0.6

    return NameRecognizer()


# ------------------------------------------------------------------------- identifiers Presidio lacks

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
          r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_MONTH_NAME = "January|February|March|April|May|June|July|August|September|October|November|December"
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|"
           "ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|DC|PR")
_UNITS = "one|two|three|four|five|six|seven|eight|nine"
_AGE_WORDS = (rf"(?i:ninety(?:[- ](?:{_UNITS}))?|(?:one[ -]|a[ -])?hundred(?:(?:[ -]and)?[ -](?:{_UNITS}|ten|eleven|twelve|"
              rf"(?:thir|four|fif|six|seven|eigh|nine)teen))?)")  # 90-119 in words
_PLACE = r"\b(?:(?:St|Ste|Ft|Mt)\.?[ \t]+)?\p{Lu}\p{Ll}+(?:[ -]\p{Lu}\p{Ll}+){0,2}"  # Fort Wayne, St. Augustine, Winston-Salem
_STREET = ("Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Ter|Circle|"
           "Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Crescent|Cres|Pike|Row|Alley|Aly|Heights|Hts|Hollow|"
           "Crossing|Mews|Plaza|Plz|Turnpike|Tpke|Expressway|Expy")  # not Walk or Run: "6 Minute Walk", "2 Mile Run"
_UNIT = r"(?:,?\s+(?i:apt|apartment|unit|suite|ste|#)\.?\s*#?[\p{L}\d-]+)?"  # ", Apt. 9-C", " Suite 516"
# what a person lives in that is no town: "lives in assisted living", "lives alone in an apartment", "lives in fear of"
_NOT_A_TOWN = (r"(?:a|an|the|his|her|their|our|own|same|this|that|of|assisted|group|senior|nursing|home|house|apartment|"
               r"condo|trailer|motel|hotel|dorm|car|van|tent|camp|jail|prison|shelter|facility|community|care|foster|rural|"
               r"town|city|area|poverty|isolation|squalor|fear|denial|pain)\b")
# an identifier value: 4+ letters and digits (at least one digit), inner dashes or slashes
_ID = r"(?=[\p{L}\d/-]{4,})(?=[\p{L}\d/-]*\d)[\p{L}\d]+(?:[-/][\p{L}\d]+)*\b"
_NO = r"\s*(?:#|no\b\.?|num(?:ber)?\b|id\b)"  # required after a label that is also a common word
_DOT = r"(?:\.(?=\s*(?:[:#\d]|no\b|num|id\b)))?"  # "Lic. 44-1902", not "Medicare. ABCD2 score"
_LABEL_END = rf"(?![\p{{L}}\d]){_DOT}(?:{_NO})?{_DOT}(?:\s+is\b)?\s*[:#]?\s*"

# kind -> labels, each followed by the identifier it labels ("MRN#: A1234567", "Acct no. 00482913")
LABELS = {
    "phone": r"pager|beeper|ext|extension",
    "ssn": r"SSN|SS|social security(?: number)?",
    "mrn": rf"MRN|MR|medical record|med rec|EMPI|(?:hospital|unit|chart|patient|pt){_NO}",
    "health_plan": rf"health plan|member|subscriber|policy|insurance|insurer|Medicaid|Medicare|beneficiary|HICN|"
                   rf"payer|(?:plan|group){_NO}",
    "account": rf"account|acct|HAR|CSN|FIN|invoice|(?:billing|encounter|visit){_NO}",
    "license": r"licen[cs]e|lic|DEA|NPI|DL(?=\s*(?:#|no\b|:))|certificate|certification",
    # a plate, but not a fusion's across spinal levels ("plate C5-C7")
    "vehicle": rf"VIN|vehicle(?: identification)?|licen[cs]e plate|plate(?!\s*:?\s*[CTLS]\d{{1,2}}\b)|(?:tag|registration){_NO}",
    "device": rf"serial|S/?N|UDI|IMEI|(?:device|implant|pacemaker|lot|model){_NO}",
    "other_id": rf"ID|identifier|accession|specimen|requisition|passport|research subject|(?:study|subject|case|sample|order|ref|path|"
                rf"reference|claim|record){_NO}",
}


# philter-lite's unlabelled id formats (the ``mrn_id`` rules of its config: "560-40-78-5", "XW277/90683"), less
# those that also match clinical values: measurements with units ("2x3cm", "1000mcg"), lab, gene and antibody
# names ("GAD65", "AQP4", "CA-125"), a lab panel written with spaces ("138 98 22"; its dashed form stays, in
# DD-DD-DD-DD), any number of 5+ digits (platelet counts, CPT codes), and a paragraph of prose, not a rule
PHILTER_ID_SKIPPED = frozenset({"mixed_010", "mixed003", "mixed004", "model_number", "DDD-DD-DD", "DDDDDD+",
                                "coding_standards"})
# a protein change in one-letter amino-acid code ("BRAF V600E", "IDH1 R132H", "LRRK2 G2019S"), which philter-lite's
# unlabelled id rules take for an id; a labelled id of that shape is still caught by its label
_PROTEIN_CHANGE = regex.compile(r"[ACDEFGHIKLMNPQRSTVWY]\d{1,4}[ACDEFGHIKLMNPQRSTVWY]")
# the same rules take gene symbols and antigen names for ids ("SCN1A", "CACNA1A", "CYP2C19", the ganglioside "GQ1b",
# "CD45RO"): letters whose digits come in runs of one or two, where philter-lite's id formats have three or more; an
# unlabelled id of that shape ("AB12C") is let go with them, a labelled one is still caught by its label
_GENE_LIKE = regex.compile(r"\p{L}{2,}(?:\d{1,2}\p{L}+)+\d{0,2}")
# philter-lite's pager rule ("84710", "FB59") also matches lab values and antigen names ("12500", "CD20"): an id
# only near a signature or a pager (Presidio's context words), as in dictation footers ("BRIGHT, M.D.  FB59")
PAGER_CONTEXT = ["m.d", "md", "dictated", "signed", "transcribed", "pager", "beeper"]


def _philter_recognizers(recognizer):
    from philter_lite.filters.filter_db import regex_db

    ids = recognizer("other_id", *[(p, SCORE_THRESHOLD) for name, p in regex_db["mrn_id"].items()
                                   if name not in PHILTER_ID_SKIPPED])
    ids.invalidate_result = lambda value: bool(_PROTEIN_CHANGE.fullmatch(value) or _GENE_LIKE.fullmatch(value))
    return [ids,
            recognizer("other_id", (regex_db["contact"]["pager"], 0.1), context=PAGER_CONTEXT, name="pager")]


def _compact_date_pattern() -> str:
    """A YYYYMMDD date after a date's cue ("Date of service: 20210304"): without one, eight digits are as often an id
    (caught as one where labelled)."""
    cue = r"(?i:date|dob|dos|born|birth|service|admit(?:ted)?|discharge(?:d)?|visit|seen|on)"
    return rf"\b{cue}\b[^\n\d]{{0,24}}?\K(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"


def _old_birth_year_pattern() -> str:
    """A birth year that shows an age over 89 (Safe Harbor removes the year then too: "Born 1931", "YOB: 1920"), by
    this year: a note is never newer than its build, so an older note's age is over-, never under-estimated."""
    years = "|".join(map(str, range(datetime.date.today().year - 90, 1849, -1)))
    return rf"\b(?i:born|b\.|birth\s+year|year\s+of\s+birth|yob)\s*(?i:in\s+)?:?\s*\K(?:{years})\b"


def _our_recognizers():
    """Presidio pattern recognizers for what Presidio lacks, one per kind; case-sensitive unless a part says (?i)."""
    from presidio_analyzer import Pattern, PatternRecognizer

    flags = regex.DOTALL | regex.MULTILINE | regex.V0

    def recognizer(kind: str, *patterns: tuple[str, float], context=None, name=""):
        return PatternRecognizer(supported_entity=kind.upper(), name=f"neurocpt_{name or kind}", context=context,
                                 global_regex_flags=flags,
                                 patterns=[Pattern(f"{kind} {i}", p, s) for i, (p, s) in enumerate(patterns)])

    age = r"(?:9\d|1[01]\d)"
    return [
        recognizer("date", (_compact_date_pattern(), 0.6), (_old_birth_year_pattern(), 0.7), name="date_more"),
        *_philter_recognizers(recognizer),
        *(recognizer(kind, (rf"(?<![\p{{L}}\d])(?i:(?:{labels}){_LABEL_END})\K{_ID}", 0.85)) for kind, labels in LABELS.items()),
        # dictation footers: author's initials, then the typists' user names ("XGT:holmes", "GPP/church/olinger")
        recognizer("name", (r"^[ \t]*\p{Lu}{2,4}[:/]\K\p{Ll}{2,}(?:/\p{Ll}{2,})*(?=[ \t]*$)", 0.7),
                   # a signature of initials: "/s/ J.K." (not a credential: "/s/ MD"). Not "-- JMK": a plan's
                   # bullets end their lines in abbreviations as often ("-- EEG", "-- NPO")
                   (rf"(?<![^\s])/s/[ \t]*\K(?!(?:{_CREDENTIAL})(?![\p{{L}}\d]))\p{{Lu}}\.?(?:[ \t]?\p{{Lu}}\.?){{1,2}}(?![\p{{L}}\d])", 0.7),
                   # a nurse's initials, told of something: "RN WK notified", "LPN D.V. aware" (not "RN MD notified")
                   (rf"(?<![\p{{L}}\d])(?:RN|LPN|NP|CNA)[ \t]+\K(?!(?:{_CREDENTIAL}|{_UNITS_OF_CARE})(?![\p{{L}}\d]))"
                    r"\p{Lu}\.?(?:[ \t]?\p{Lu}\.?){1,2}"
                    r"(?=[ \t]+(?:notified|aware|informed|paged|updated)\b)", 0.7)),
        # labelled values written with spaces, which the labelled-id rule above stops at: an SSN with spaced
        # separators ("SSN: 575 - 57 - 6938"), a plate in two groups ("License plate SNG 4319", "plate: CL8 W66"), and
        # a GS1 device identifier, whose (01) product part precedes the (21) serial ("(01)00643169007222(21)NE42133")
        recognizer("ssn", (r"(?<![\p{L}\d])(?i:SSN|SS|social\s+security(?:\s+number)?)\s*(?:#|no\.?|num(?:ber)?)?\s*:?\s*"
                           r"\K\d{3}\s*[-./ ]\s*\d{2}\s*[-./ ]\s*\d{4}\b", 0.85), name="ssn_spaced"),
        recognizer("vehicle", (r"(?<![\p{L}\d])(?i:licen[cs]e\s+plate\s*(?:#|no\.?|number)?|plate\s*(?:#|no\.?|number|:)|tag\s*(?:#|no\.?))"
                               # not spinal levels, which a fusion's plate spans ("Plate: C5 C6")
                               r"\s*:?\s*\K(?![CTLS]\d{1,2}[ -][CTLS]\d)(?=[A-Z\d -]{5,9}\b)(?=[A-Z\d -]*\d)[A-Z\d]{1,4}[ -][A-Z\d]{1,4}\b", 0.85), name="plate"),
        recognizer("device", (r"\(01\)\d{14}(?:\(\d{2,4}\)[\p{L}\d-]+)*", 0.85), name="udi"),
        # an e-mail address written out against harvesting ("jdoe at example dot com", "jdoe[at]example.org")
        recognizer("email", (r"(?<![\p{L}\d._+-])[\p{L}\d._+-]++\s*(?i:\s\bat\b\s|\[at\]|\(at\))\s*[\p{L}\d-]+(?:\s*(?i:\s\bdot\b\s|\[dot\]|\(dot\)|\.)"
                             r"\s*[\p{L}\d-]+)*?\s*(?i:\s\bdot\b\s|\[dot\]|\(dot\)|\.)\s*(?i:com|org|net|edu|gov|mil|info|biz|io|us|uk|ca|mx)\b", 0.85),
                   name="email_spelled"),
        recognizer("vehicle", (r"\b(?=[A-HJ-NPR-Z\d]{17}\b)(?=[A-Z\d]*\d)(?=[A-Z\d]*[A-Z])[A-HJ-NPR-Z\d]{17}\b", 0.6)),
        recognizer("zip", (rf"\b(?:{_STATES})\s{{1,2}}\K\d{{5}}(?:-\d{{4}})?\b", 0.7),
                   (r"\b(?i:zip|zip code|postal code|zipcode)\s*:?\s*\K\d{5}(?:-\d{4})?\b", 0.85)),
        # a street's words capitalised or numbered ("1200 W. 38th St."), or a numbered route ("9723 Route 9")
        recognizer("address", (rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+)?(?:(?:\p{{Lu}}[\p{{L}}'.-]*|\d{{1,3}}(?:st|nd|rd|th))\s+){{1,3}}"
                               rf"(?:{_STREET})\b\.?{_UNIT}", 0.7),
                   (rf"\b\d{{1,6}}\s+(?:(?:State|US|County|Co\.?)\s+)?(?:Route|Rte\.?|Road|Rd\.?|Highway|Hwy\.?)\s+\d{{1,4}}[A-Z]?\b{_UNIT}", 0.7),
                   (r"\b(?i:p\.?\s?o\.?\s+box)\s+\d+\b", 0.7)),
        recognizer("city", (rf"{_PLACE}(?=,\s*(?:{_STATES})\b(?:\s+\d{{5}}|\s*[.;)]|\s*$)|\s+(?:{_STATES})\s+\d{{5}}\b)", 0.7),
                   (rf"{_PLACE}\s+(?:County|Parish|Township)\b", 0.7),
                   (r"\b(?i:lives|living|lived|resides|residing|resident|born|moved|relocated|grew up|travel(?:l?ed)?|"
                    r"emigrated|immigrated)"  # not "transferred" or "native": "transferred to Neurology", "native of Spanish"
                    rf"\s+(?i:alone\s+|with\s+\p{{Ll}}+\s+)?(?i:in|to|at|near|from|of)\s+\K{_PLACE}", 0.6),
                   # in lower case, only where the words end a sentence after "lives/resides (alone) in", and none
                   # of them says what else one lives in ("lives alone in bangor.", not "lives in assisted living.")
                   (rf"\b(?i:lives|living|resides|residing)\s+(?i:alone\s+)?(?i:in|near)\s+\K(?!{_NOT_A_TOWN})"
                    rf"\p{{Ll}}[\p{{Ll}}'’.-]*(?:[ \t](?!{_NOT_A_TOWN})\p{{Ll}}[\p{{Ll}}'’-]*){{0,2}}(?=\.?[ \t]*(?:[;,\n]|\.(?:[ \t]|$)|$))", 0.6),
                   # a facility's town ("transferred from an outside hospital in Bozeman")
                   (rf"\b(?i:hospital|facility|nursing\s+home|SNF|rehab)\s+(?i:in|at|near)\s+\K(?!(?:{_MONTH_NAME})\b){_PLACE}\b", 0.6)),
        recognizer("date", (rf"\b{_MONTH}\s+{_DAY}(?:,?\s+\d{{4}})?\b", 0.6),
                   (rf"\b{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+\d{{4}})?\b", 0.6),
                   (rf"\b{_MONTH},?\s+(?:19|20)\d\d\b", 0.6),
                   (r"\b(?:0?[1-9]|1[0-2])[./-](?:0?[1-9]|[12]\d|3[01])[./-](?:19|20)?\d\d\b", 0.6),
                   # a month and a year in digits, as "April 2023" above ("last infusion 04/2023")
                   (r"(?<![\p{L}\d/.-])(?:0?[1-9]|1[0-2])[/-](?:19|20)\d\d\b(?![/-]\d)", 0.6),
                   (r"\b(?i:on|since|until|till|through|dated|as of|starting|admitted|discharged|DOB|DOS|onset|LKW|"
                    r"last known well|last seen)\s*:?\s*"
                    r"\K(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01])\b(?!/)", 0.6),
                   # "in 3/80", "with 8/79", "for cath 2/18"; not a score out of 10 ("pain 3/10")
                   (r"\b(?i:in|from|with|for|to|after|before|prior|since|until|cath)\s+\K(?:0?[1-9]|1[0-2])/(?!10\b)\d\d\b(?!/)", 0.6),
                   # the months grouped: an alternation left bare made every "May" and "March" a date, inside a word too
                   # ("Mayzent", "Marchiafava-Bignami", "May consider LP")
                   (rf"\b(?i:in|since|from|until|till|through|during|by|of|last|next|early|late|mid)\s+\K(?:{_MONTH_NAME})\b", 0.6),
                   # an ISO 8601 time stamp ("2021-03-04T10:22"): Presidio's ISO date needs a word boundary after the day
                   (r"\b(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])T\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?", 0.6),
                   # a month and day with a leading zero ("04/07", "12/08"): scores and fractions are not written so
                   (r"(?<![\d/.:])(?:0[1-9]/(?:0[1-9]|[12]\d|3[01])|1[0-2]/0[1-9])(?![\d/]|\.\d)", 0.6)),
        recognizer("age", (rf"\b{age}(?=\s*-?\s*(?i:years?|yrs?|y/?o|y\.o\.)\b|\s?[MF]\b|\s+(?i:male|female|man|woman)\b)"
                           r"(?<!\b(?i:t|temp|temperature|tmax)\s*:?\s*\d+)", 0.7),
                   (rf"\b(?i:age[ds]?|aged)\s*:?\s*\K{age}\b", 0.7),
                   (r"\b(?i:in\s+(?:his|her|their|the)\s+(?:early\s+|mid-?|late\s+)?)\K(?:90|100)s\b", 0.7),
                   # in words ("ninety-two-year-old", "Age ninety-one", "she is one hundred and two"), only with an age's
                   # unit, sex or cue: a bare "ninety" is as often minutes, a percentage or a heart rate
                   (rf"\b{_AGE_WORDS}(?=\s*-?\s*(?i:years?|yrs?|y/?o|y\.o\.)\b|\s+[MF]\b|\s+(?i:male|female|man|woman|gentleman|lady)\b)", 0.7),
                   # not a share or an amount ("she is one hundred percent compliant", "aged ninety minutes")
                   (rf"\b(?i:age[ds]?|aged|turned|turns|(?:he|she|patient|pt)\s+is)\s*:?\s*\K{_AGE_WORDS}\b"
                    r"(?![ \t-]*(?i:percent|per\s*cent|%|times|minutes?|mins?|seconds?|hours?|days?|degrees?|mg|mcg|ml|units?)\b)", 0.7)),
    ]


def _presidio_recognizers():
    """Presidio's recognizers for the kinds above, configured for offline use and notes."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer, DateRecognizer, EmailRecognizer, IbanRecognizer, IpRecognizer, MacAddressRecognizer,
        MedicalLicenseRecognizer, PhoneRecognizer, UrlRecognizer, UsBankRecognizer, UsClaimNumberRecognizer,
        UsItinRecognizer, UsMbiRecognizer, UsNpiRecognizer, UsPassportRecognizer, UsPrescriptionNumberRecognizer,
        UsPriorAuthorizationNumberRecognizer, UsReferralNumberRecognizer, UsSsnRecognizer, UuidRecognizer)

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail recognizer checking the domain against the public-suffix list bundled with tldextract
        (tldextract's default fetches the list from the network)."""

        _suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        def validate_result(self, pattern_text: str) -> bool:
            return self._suffixes(pattern_text).fqdn != ""

    class SsnRecognizer(UsSsnRecognizer):
        """Presidio's SSN rules, except that the published sample numbers (123-45-6789) count too: a guard
        for training text does not trust a number because it is a well-known example."""

        def invalidate_result(self, pattern_text: str) -> bool:
            digits = "".join(c for c in pattern_text if c.isdigit())
            return super().invalidate_result(pattern_text) and digits not in ("123456789", "987654320", "078051120")

    return [
        OfflineEmailRecognizer(), SsnRecognizer(), UrlRecognizer(), IpRecognizer(), DateRecognizer(),
        # leniency 0 (possible numbers): a guard also catches numbers with an unassigned area code
        PhoneRecognizer(supported_regions=("US",), leniency=0,  # US covers the whole North American plan
                        context=PhoneRecognizer.CONTEXT + ["fax", "pager", "tel", "ph"]),
        CreditCardRecognizer(), IbanRecognizer(), UsBankRecognizer(), MedicalLicenseRecognizer(),
        UsPassportRecognizer(), UsItinRecognizer(), UsNpiRecognizer(), UsMbiRecognizer(),
        MacAddressRecognizer(), UuidRecognizer(),
        UsClaimNumberRecognizer(), UsPriorAuthorizationNumberRecognizer(), UsPrescriptionNumberRecognizer(),
        UsReferralNumberRecognizer(),
    ]


@functools.cache
def analyzer():
    """The Presidio analyzer of the rules, built once per process (a few seconds: spaCy, the name lists)."""
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    def lower_lemma(doc):  # a blank pipeline has no lemmas; Presidio's context words are matched on them
        for token in doc:
            token.lemma_ = token.lower_
        return doc

    spacy.Language.component("neurocpt_lower_lemma", func=lower_lemma)

    class BlankEnglish(SpacyNlpEngine):
        """spaCy's rule-based English tokenizer, no model: tokens and lemmas for Presidio's context words."""

        def load(self) -> None:
            nlp = spacy.blank("en")
            nlp.add_pipe("neurocpt_lower_lemma")
            self.nlp = {"en": nlp}

        def process_text(self, text: str, language: str):
            artifacts = super().process_text(text, language)
            # Presidio's context scoring walks the tokens once per finding: a list of strings, not the
            # spaCy Doc (whose iteration builds Token objects), halves the guard's time
            artifacts.tokens = [token.text for token in artifacts.tokens]
            return artifacts

    nlp = BlankEnglish(models=[{"lang_code": "en", "model_name": "blank"}])
    registry = RecognizerRegistry(recognizers=[*_presidio_recognizers(), *_our_recognizers(), _name_recognizer()])
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, default_score_threshold=SCORE_THRESHOLD)


# ------------------------------------------------------------------------------------ a model beside them

# De-identification models' labels (B-/I-/L-/U-/E-/S- dropped, upper case) -> kinds. The label sets of i2b2 2014 and
# of models trained on it and its successors (obi's deid_roberta_i2b2: STAFF, HOSP, LOC, OTHERPHI; StanfordAIMI's
# stanford-deidentifier: HCW, VENDOR), and CoNLL's PER and LOC. Hospitals and other organisations count as places
# (i2b2 counts them as PHI; a named clinic places a patient). None: not a Safe Harbor identifier (a state, a
# country, a profession), or one the rules decide (ages: Safe Harbor removes only those over 89).
MODEL_LABELS: dict[str, str | None] = {
    **dict.fromkeys(("PATIENT", "DOCTOR", "STAFF", "HCW", "PERSON", "PER", "NAME", "USERNAME"), "name"),
    **dict.fromkeys(("STREET", "ADDRESS", "LOC", "LOCATION", "LOCATION-OTHER", "LOCATION_OTHER", "HOSPITAL", "HOSP",
                     "ORGANIZATION", "VENDOR"), "address"),
    "CITY": "city", "ZIP": "zip", "DATE": "date", "PHONE": "phone", "FAX": "phone", "EMAIL": "email", "URL": "url",
    "CONTACT": "phone",  # i2b2's category of phone, fax, e-mail and URL, for models trained on the categories alone
    "WEB": "url", "IPADDR": "ip", "IP": "ip", "MEDICALRECORD": "mrn", "MRN": "mrn", "HEALTHPLAN": "health_plan",
    "ACCOUNT": "account", "LICENSE": "license", "VEHICLE": "vehicle", "DEVICE": "device", "SSN": "ssn",
    **dict.fromkeys(("IDNUM", "ID", "BIOID", "OTHERPHI"), "other_id"),
    **dict.fromkeys(("STATE", "COUNTRY", "PROFESSION", "AGE"), None),
}
_LABEL_PREFIX = regex.compile(r"^[BILUES]-")
_NOT_PHI = "NOT_PHI"  # the entity a label mapped to None gets: Presidio's recognizer keeps unmapped labels as they are


def model_labels(path: str, overrides: dict[str, str | None] | None = None) -> tuple[tuple[str, str | None], ...]:
    """The model's labels (its config.json's ``id2label``, prefixes dropped, ``O`` aside) -> kinds, by
    :data:`MODEL_LABELS` and ``overrides``. A label in neither stops here, before any worker loads the model: a
    label left out silently would pass its identifiers."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"phi_model: {config} not found (a local transformers token-classification model "
                                "folder: config.json, weights and tokenizer)")
    id2label = json.loads(config.read_text()).get("id2label") or {}
    mapping = {**MODEL_LABELS, **{k.upper(): v for k, v in (overrides or {}).items()}}
    wrong = {k: v for k, v in mapping.items() if v is not None and v not in KINDS}
    if wrong:
        raise ValueError(f"phi_model.labels: {wrong} map to no kind; kinds: {', '.join(KINDS)} (or null: not an identifier)")
    labels = sorted({_LABEL_PREFIX.sub("", str(label)).upper() for label in id2label.values()} - {"O"})
    if not labels:
        raise ValueError(f"phi_model: {config} names no labels (id2label): not a token-classification model")
    unknown = [label for label in labels if label not in mapping]
    if unknown:
        raise ValueError(f"phi_model: the labels {unknown} of {path} have no kind; map each under phi_model.labels "
                         f"to one of {', '.join(KINDS)}, or to null if it is not an identifier")
    return tuple((label, mapping[label]) for label in labels)


def model_device(model: PHIModel) -> str:
    """The model's device in this process: the one given, else a GPU where there is one, the build's forked workers
    spread over the GPUs this process sees by their slots (each loads its own copy), else the CPU."""
    import torch

    from preprocessing.local_executor import worker_slot

    if model.device is not None:
        return model.device
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{worker_slot() % torch.cuda.device_count()}"


# what an eponym names after it: "Parkinson disease", "Wilson's disease", "Babinski sign", "Glasgow Coma Scale"
_NAMED = (r"(?:['’]s)?[ \t]+(?:coma[ \t]+|spotted[ \t]+)?(?:disease|syndrome|signs?|palsy|paralysis|phenomenon|aphasia|"
          r"scale|score|grade|stage|maneuver|manoeuvre|test|reflex|malformation|encephalopathy|ataxia|chorea|"
          r"bod(?:y|ies)|area|criteria|classification|triad|pupil|dementia|tremor|disorder|variant|neuralgia|dystrophy)")
_EPONYM_NOUN = regex.compile(rf"{_NAMED}\b", flags=regex.I)
_ENDS_IN_EPONYM_NOUN = regex.compile(rf"{_NAMED}$", flags=regex.I)  # a find that took the noun in: "Parkinson disease"
# eponyms that name the disease by themselves in the possessive: "a history of Parkinson's"
_EPONYM_DISEASES = frozenset({"alzheimer", "huntington", "meniere", "parkinson", "tourette"})


def _eponym_in_use(text: str, start: int, end: int) -> bool:
    """Whether a name found at ``text[start:end]`` is an eponym used as one: each of its words an eponym, and the
    term a hyphened pair ("Guillain-Barré"), before what it names ("Parkinson disease", "Babinski's sign"; the
    find may hold that noun too), or a disease by itself ("Parkinson's"). The rules never take these for people; a
    model trained on general text (or on notes of another specialty) does."""
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "-"):  # the term: "Barré" of "Guillain-Barré"
        start -= 1
    while end < len(text) and (text[end].isalpha() or text[end] == "-"):
        end += 1
    noun = _ENDS_IN_EPONYM_NOUN.search(text, start, end)
    term = text[start:noun.start() if noun else end]
    keys = [_key(word) for word in term.split()]
    if not keys or not all(k and _eponym(k) for k in keys):
        return False
    return (noun is not None or "-" in term or bool(_EPONYM_NOUN.match(text, end))
            or (keys[-1] in _EPONYM_DISEASES and text[end:end + 2] in ("'s", "’s")))


def model_batch_size(model: PHIModel) -> int:
    """Chunks a forward pass of the model takes: the one given, else 32 on a GPU (one chunk at a time leaves it
    mostly idle) and 1 on a CPU, where a pass of many fills no idle units and its padding costs (a RoBERTa-base
    shape on one thread: 448 tokens a second one chunk a pass, docs/benchmarks.md)."""
    if model.batch_size is not None:
        return model.batch_size
    return 32 if model_device(model).startswith("cuda") else 1


def documents_per_batch(model: PHIModel | None) -> int:
    """Documents the guard takes at a time: with a model, 4 of its batches, so that their chunks, sorted by length,
    share a pass with chunks of about their length (a pass pads each to its longest); without, one."""
    return 4 * model_batch_size(model) if model else 1


@functools.cache
def _model_recognizer(model: PHIModel):
    """Presidio's recognizer for a transformers token-classification model (``HuggingFaceNerRecognizer``), over
    chunks that fill the model's context as its own tokenizer counts (a chunk longer than the context would be cut
    short, its end unread), built once per process and model (it loads at its first texts). ``find`` runs the
    chunks of many texts through the model together, :func:`model_batch_size` a pass; Presidio's recognizer runs
    one chunk at a time, which leaves a GPU idle. Two changes for a guard: a failure stops it, where Presidio's logs
    it and goes on without the chunk, and the labels mapped to None are dropped, as are names that are eponyms in
    use (:func:`_eponym_in_use`)."""
    from presidio_analyzer.chunkers import TokenizerBasedTextChunker
    from presidio_analyzer.predefined_recognizers.ner.huggingface_ner_recognizer import HuggingFaceNerRecognizer

    class Batch:
        """The model's pipeline behind Presidio's call for each chunk: it answers from a batch run ahead (the
        chunks sorted by length, so that little of a pass is padding), runs a chunk outside it alone, and keeps
        what it raised."""

        def __init__(self, pipeline):
            self.pipeline, self.answers, self.error = pipeline, {}, None

        def run(self, chunks: list[str]) -> None:
            chunks = sorted(set(chunks), key=len)
            if chunks:
                self.answers = dict(zip(chunks, self.pipeline(chunks, batch_size=model_batch_size(model))))

        def __call__(self, text: str):
            if text in self.answers:
                return self.answers[text]
            try:
                return self.pipeline(text)
            except Exception as err:
                self.error = err
                raise

    class DeidModel(HuggingFaceNerRecognizer):
        def load(self) -> None:
            if self.ner_pipeline is None:
                super().load()
                # the chunker counts a whole text's tokens to cut it to the context: transformers' warning that
                # such a sequence is too long for the model, meant for inputs, does not apply
                self.ner_pipeline.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
                self.ner_pipeline = Batch(self.ner_pipeline)

        def find(self, texts: list[str]) -> list[list]:
            """Each text's finds (Presidio's results)."""
            self.load()
            chunks = []
            for text in texts:  # what Presidio's chunking passes the pipeline: a text of one chunk whole
                cut = self.text_chunker.chunk(text) if text.strip() else []
                chunks += [text] if len(cut) == 1 else [c.text for c in cut]
            batch = self.ner_pipeline
            batch.error = None
            try:
                batch.run(chunks)
                found = [self.analyze(text, []) for text in texts]
            except Exception as err:
                batch.error = err
            finally:
                batch.answers = {}
            if batch.error is not None:
                raise PHIModelError(f"the PHI model {model.path} failed: {batch.error!r}") from batch.error
            return [[r for r in results if r.entity_type != _NOT_PHI
                     and not (r.entity_type == "NAME" and _eponym_in_use(text, r.start, r.end))]
                    for text, results in zip(texts, found)]

    mapping = {label: kind.upper() if kind else _NOT_PHI for label, kind in model.labels}
    return DeidModel(model_name=model.path, label_mapping=mapping, supported_entities=sorted(set(mapping.values())),
                     threshold=SCORE_THRESHOLD, device=model_device(model), text_chunker=TokenizerBasedTextChunker(),
                     label_prefixes=["B-", "I-", "L-", "U-", "E-", "S-"], name="neurocpt_phi_model")


# ------------------------------------------------------------------------------------------- API


def _pieces(text: str, size: int = PIECE_CHARS, overlap: int = PIECE_OVERLAP):
    """(offset, piece) of ``text`` in pieces of at most ``size`` characters, each cut after a line in its second half
    (else after a word) and each after the first beginning at a word up to ``overlap`` characters before the one
    before it ended: an identifier's label and its value are in one piece wherever the cut falls (apart, the value
    of a weak pattern such as an account number scored too low to be redacted)."""
    start = 0
    while len(text) - start > size:
        stop = start + size
        cut = next((c for c in (text.rfind("\n", start + size // 2, stop), text.rfind(" ", start, stop)) if c > start),
                   stop - 1)
        yield start, text[start:cut + 1]
        back = max(start + 1, cut + 1 - overlap)
        space = regex.search(r"\s", text[back:cut + 1])
        start = back + space.end() if space else back
    yield start, text[start:]


def phi_spans_of(texts: list[str], model: PHIModel | None = None) -> list[list[Span]]:
    """:func:`phi_spans` of each text, ``model`` run over the chunks of all of them together (the guard passes a
    batch of documents)."""
    by_model = _model_recognizer(model).find(texts) if model and texts else [[] for _ in texts]  # none: no load
    return [_spans(text, found) for text, found in zip(texts, by_model)]


def phi_spans(text: str, model: PHIModel | None = None) -> list[Span]:
    """Identifier spans in ``text``, by the rules and ``model`` if given, trailing punctuation left out, overlaps
    merged (the longest part, then the surest, then one of a kind other than ``other_id``, names the kind); none
    inside an upstream placeholder."""
    return phi_spans_of([text], model)[0]


def _spans(text: str, by_model: list) -> list[Span]:
    """:func:`phi_spans` of ``text`` from the rules' finds (in pieces) and the model's (Presidio's results)."""
    protected = [m.span() for m in _PLACEHOLDER.finditer(text)]
    results = [(offset + r.start, offset + r.end, r) for offset, piece in _pieces(text)
               for r in analyzer().analyze(piece, language="en")]
    found = []
    for start, end, r in results + [(r.start, r.end, r) for r in by_model]:
        end = start + len(text[start:end].rstrip(".,;:)"))
        kind = _PRESIDIO_KIND.get(r.entity_type, r.entity_type.lower())
        if kind == "phone" and text[end:end + 1].isalnum() and (space := text.rfind(" ", start, end)) > start:
            end = space  # a number's "extension" that is the start of a word: "219-09-9999 1p/19q"
        if end > start and not any(start < pe and ps < end for ps, pe in protected):
            found.append((start, end, kind, r.score))
    merged: list[list] = []  # start, end, kind, (length, score, specific) of the part that named it
    for start, end, kind, score in sorted(found):
        rank = (end - start, score, kind != "other_id")  # the catch-all kind names a span only where no other can
        if merged and start < merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], end)
            if rank > last[3]:
                last[2:] = kind, rank
        else:
            merged.append([start, end, kind, rank])
    return [Span(s, e, k) for s, e, k, _ in merged]


def redact_phi(text: str, spans: list[Span] | None = None, model: PHIModel | None = None) -> str:
    """``text`` with every identifier (``spans``, else :func:`phi_spans`'s) replaced by its typed placeholder
    (``[NAME]``, ``[DATE]``, ...)."""
    out, last = [], 0
    for s in phi_spans(text, model) if spans is None else spans:
        out += [text[last:s.start], f"[{s.kind.upper()}]"]
        last = s.end
    return "".join(out) + text[last:]
