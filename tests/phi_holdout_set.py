"""An independent labelled set for the PHI guard, written by an outside audit without looking at the guard's
tuning set (``tests/phi_eval_set.py``): none of its templates, name lists, cities or value formats are reused,
and no name comes from Faker (the guard reads Faker's lists, so drawing from them would measure the lists
against themselves). Names are hand-written lists of many origins, particle, hyphenated and Mc/Mac/O'
surnames, surnames that are also English words or eponyms (Miller, Walker, Young), nicknames, initials, and
invented names built from syllables (a name that is in no list at all).

Two halves, so a fix can be made on one and measured on the other:

* ``DEV``: the templates and value formats a fixer may look at.
* ``HELDOUT``: a different seed, the DEV templates and formats plus template families and value formats that
  only it has (marked ``H`` below). Do not tune the guard on its misses; measure it, and report.

``holdout_notes(half, n)``: notes with planted identifiers of every kind the guard names (``phi.KINDS``),
each labelled (kind, start, end) like ``phi_eval_set.Note``; ``holdout_clean_notes(half, n)``: identifier-free
notes full of traps: eponyms, syndromes and scales outside neurology's best known (Hoehn and Yahr, Spetzler-
Martin, Berg Balance Scale), diseases named after places (Lyme, West Nile, St. Louis encephalitis), drug names
newer than the guard's lists, gene, antibody and lab names (anti-Yo, anti-Hu, LGI1, ANA 1:160), doses, scores,
years alone (Safe Harbor keeps a year), capitalised section headers and service names after role words
("Discussed with Palliative Care"). ``PROTECTED``: the trap terms that must come out untouched.

What counts as an identifier here (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)): every element of a date but the
year (a day and month, a month with a day or alone in a date phrase, a time stamp's date), so "in 2019" is
kept and "3/4", "Mar 3", "the 4th" are dates; an age over 89 in digits or words; any part of a name, initials
included; a city, county, street or ZIP (any geographic unit smaller than a state); the numbers of the listed
kinds. Biometric identifiers and photographs are not planted: the guard names no such kind, and text holds
at most a mention of one, which is not itself an identifier.
"""

from __future__ import annotations

import random
import re
import string
from typing import NamedTuple


class Note(NamedTuple):  # the shape of phi_eval_set.Note, so that its scoring (recall_by_kind) reads these too
    text: str
    labels: list[tuple[str, int, int]]  # (kind, start, end)

DEV, HELDOUT = "dev", "heldout"
SEEDS = {DEV: 7001, HELDOUT: 9029}  # clean notes use seed + 1

# ------------------------------------------------------------------------------------------- names

GIVEN = ["Adaeze", "Bartholomew", "Cosmin", "Dagny", "Eilidh", "Folasade", "Gunnar", "Hamid", "Ilse", "Jovan",
         "Kalani", "Laszlo", "Marisol", "Nnamdi", "Oksana", "Parisa", "Quentin", "Radhika", "Seamus", "Thandiwe",
         "Ulrich", "Vesna", "Wiremu", "Ximena", "Yaw", "Zainab", "Agnieszka", "Bongani", "Catalina", "Dariusz",
         "Esperanza", "Farrukh", "Giedre", "Ifeoma", "Jorunn", "Keoni", "Lwazi", "Malak", "Nilufar", "Orla",
         "Paavo", "Rangi", "Svetlana", "Tadeo", "Valentina", "Wendell", "Hyun-woo", "Anh", "Tuan", "Jia-Hui",
         "Mohammed", "Guadalupe", "Beatriz", "Dolores", "Ebenezer", "Harriet", "Cornelius", "Winifred",
         # given names that are also English words or months
         "Rose", "Hope", "Faith", "Grant", "Hunter", "Dawn", "Frank", "Joy", "June", "April", "Summer", "Ray"]
NICK = ["Bubba", "Peggy", "Bobbie", "Chuy", "Nacho", "Pepe", "Sasha", "Misha", "Kiki", "Tommy", "Lulu", "Gigi",
        "Sonny", "Butch", "Cookie", "Skip", "Dottie", "Junior"]
FAMILY = ["van der Berg", "De La Cruz", "McAllister", "MacLeod", "O'Neil", "d'Angelo", "Al-Hassan", "ben David",
          "Nwachukwu", "Oyelaran", "Szczepański", "Wójcik", "Papadopoulos", "Kristiansen", "Vasquez-Ortega",
          "Fitzgerald", "Delacroix", "Van Buren", "St. Clair", "Le Roux", "Da Silva", "dos Santos", "Abernathy",
          "Whitlock", "Featherstone", "Grimaldi", "Bhattacharya", "Raghunathan", "Tshabalala", "Mahlangu",
          "Haugland", "Eriksdottir", "Hakobyan", "Karapetyan", "Yamaguchi", "Phan", "Truong", "Ochieng", "Mwangi",
          "Quispe", "Mamani", "Okonkwo", "Balogun", "Brzezinski", "Horvath", "Nagy", "Sokolov", "Rahimi",
          "Mansour", "Rosenthal", "Birnbaum", "Lindgren", "Halvorsen", "Kealoha", "Tuilagi", "Begay", "Yazzie",
          "Tsosie", "MacDonald-Ferris", "O'Shaughnessy",
          # surnames that are English words, or are the guard's eponyms (common US surnames all the same)
          "Young", "Price", "Bishop", "Moody", "Stone", "Little", "Strong", "Love", "Rice", "Fox",
          "Miller", "Wilson", "Walker", "Jackson", "Robertson", "Fisher", "Bell", "Lambert", "Weber", "Todd"]
_ONSET = ["Ka", "Zu", "Mir", "Tal", "Ove", "Bri", "Sen", "Lio", "Dre", "Vash", "Qui", "Ro", "Ny", "Eze", "Tor"]
_CODA = ["ren", "vik", "ssa", "dro", "mae", "lin", "tavo", "bek", "ola", "rith"]
_SUR_A = ["Qua", "Brek", "Dol", "Vant", "Osk", "Hel", "Tam", "Gris", "Ulv", "Mor", "Zel"]
_SUR_B = ["mire", "staad", "ovic", "erly", "ash", "grove", "quist", "anko", "ebe", "ritch"]


def _invented(rng: random.Random, part: str) -> str:
    """A name in no list: syllables put together ("Mirtavo Brekstaad")."""
    return rng.choice(_ONSET) + rng.choice(_CODA) if part == "given" else rng.choice(_SUR_A) + rng.choice(_SUR_B)


def _given(rng):
    return _invented(rng, "given") if rng.random() < 0.2 else rng.choice(GIVEN)


def _family(rng):
    return _invented(rng, "family") if rng.random() < 0.2 else rng.choice(FAMILY)


def _initial(rng):
    return rng.choice("ABCDEFGHJKLMNPRSTVWZ")


# name formats: (format, DEV too); False: HELDOUT only
NAME_FORMATS = [
    (lambda r: f"{_given(r)} {_family(r)}", True),
    (lambda r: f"{_family(r)}, {_given(r)} {_initial(r)}.", True),
    (lambda r: f"{_family(r).upper()}, {_given(r).upper()}", True),
    (lambda r: f"{_given(r).lower()} {_family(r).lower()}", True),
    (lambda r: f"{_given(r)} {_initial(r)}. {_family(r)}", True),
    (lambda r: f"{_given(r).upper()} {_family(r).upper()}", False),
    (lambda r: f"{_family(r)} {_given(r)}", False),  # family name first, no comma
    (lambda r: f"{_initial(r)}. {_family(r)}", False),
    (lambda r: f"{_family(r).lower()}, {_given(r).lower()}", False),
]


# ------------------------------------------------------------------------------------------- places

TOWNS = [("Kalamazoo", "MI"), ("Tuscaloosa", "AL"), ("Walla Walla", "WA"), ("Poughkeepsie", "NY"),
         ("Chattanooga", "TN"), ("Muskogee", "OK"), ("Bozeman", "MT"), ("Duluth", "MN"), ("Lubbock", "TX"),
         ("Sheboygan", "WI"), ("Paducah", "KY"), ("Bangor", "ME"), ("Hilo", "HI"), ("Yakima", "WA"),
         ("Winston-Salem", "NC"), ("St. Augustine", "FL"), ("Coeur d'Alene", "ID"), ("Fort Wayne", "IN"),
         ("Las Cruces", "NM"), ("Baton Rouge", "LA"), ("Cedar Rapids", "IA"), ("Eau Claire", "WI"),
         ("Grand Forks", "ND"), ("Pocatello", "ID"), ("Flagstaff", "AZ"), ("Wheeling", "WV"), ("Bethesda", "MD")]
ABROAD = ["Oaxaca", "Lagos", "Tegucigalpa", "Krakow", "Kumasi", "Cebu", "Mosul", "Chennai", "Asmara", "Medellin"]
COUNTIES = ["Kootenai County", "Washtenaw County", "St. Tammany Parish", "Hennepin Co.", "Cuyahoga County",
            "Maricopa County", "Travis Co."]
ROADS = ["Quarry Ridge Rd", "Applegate Crescent", "Old Mill Pike", "Harbor View Ter", "W. 38th St.", "Route 9",
         "Bluebonnet Ln", "Juniper Hollow Road", "Kings Hwy", "Sycamore Row", "Tamarack Trail", "E Fifth Ave",
         "Lakeshore Drive", "Overlook Heights", "Mulberry Alley"]


def _digits(r: random.Random, n: int) -> str:
    return "".join(r.choice(string.digits) for _ in range(n))


def _caps(r: random.Random, n: int) -> str:
    return "".join(r.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(n))


def _street(r: random.Random, dev: bool) -> str:
    formats = [lambda: f"{r.randint(2, 9999)} {r.choice(ROADS)}",
               lambda: f"{r.randint(2, 999)} {r.choice(ROADS)}, Apt. {r.randint(1, 9)}-{r.choice('ABCDEF')}",
               lambda: f"{r.randint(100, 9999)} {r.choice(ROADS)} Suite {r.randint(100, 950)}",
               lambda: f"P.O. Box {r.randint(2, 99999)}"]
    if not dev:
        formats += [lambda: f"RR {r.randint(1, 9)} Box {r.randint(1, 400)}",
                    lambda: f"{r.randint(2, 999)} {r.choice(ROADS).lower()}",
                    lambda: f"HC {r.randint(10, 90)} Box {r.randint(1, 99)}",
                    lambda: f"{r.randint(2, 9999)} County Road {r.randint(1, 300)}"]
    return r.choice(formats)()


def _zip(r):
    return r.choice([_digits(r, 5), f"{_digits(r, 5)}-{_digits(r, 4)}"])


# ------------------------------------------------------------------------------------------- dates and ages

_MON = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
        "November", "December"]
_WEEKDAY = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(d: int) -> str:
    return f"{d}{'th' if 10 < d % 100 < 14 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"


def _date(r: random.Random, dev: bool) -> str:
    y, m, d = r.randint(1995, 2026), r.randint(1, 12), r.randint(1, 28)
    mon = _MON[m - 1]
    formats = [f"{_ordinal(d)} of {mon}", f"{mon[:3]} {d}", f"{m:02d}/{d:02d}", f"{m}/{d}/{y % 100:02d}",
               f"{y}-{m:02d}-{d:02d}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}", f"{mon} {_ordinal(d)}",
               f"{d}-{mon[:3]}-{y % 100:02d}", f"{mon[:3]}. {d}, {y}"]
    if not dev:
        formats += [f"{d:02d}{mon[:3].upper()}{y}", f"{y}/{m:02d}/{d:02d}", f"{d}.{m}.{y}",
                    f"{_WEEKDAY[r.randint(0, 6)]} {m}/{d}", f"{mon.lower()} {d}", f"{m}-{d}-{y}"]
    return r.choice(formats)


_UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _age_value(r: random.Random, dev: bool) -> tuple[str, tuple[int, int]]:
    """An age over 89 with its unit; the label covers the number only ("92" of "92yo")."""
    age = r.randint(90, 104)
    words = ("ninety" + (f"-{_UNITS[age - 90]}" if age > 90 else "")) if age < 100 else \
        "one hundred" + (f" and {_UNITS[age - 100]}" if age > 100 else "")
    formats = [(str(age), "yo"), (str(age), " y/o"), (str(age), "-year-old"), (str(age), " yrs"), (words, "-year-old"),
               (words, "")]
    if not dev:
        formats += [(str(age), "y"), (str(age), " years of age"), (words.capitalize(), " years old"), (str(age), "yr")]
    value, unit = r.choice(formats)
    return value + unit, (0, len(value))


# ------------------------------------------------------------------------------------------- numbers


def _phone(r: random.Random, dev: bool) -> str:
    a, b, c = r.randint(201, 989), r.randint(200, 999), _digits(r, 4)
    formats = [f"({a}){b}-{c}", f"{a}.{b}.{c}", f"{a}-{b}-{c} ext. {_digits(r, 4)}", f"+44 20 {_digits(r, 4)} {_digits(r, 4)}",
               f"1-{a}-{b}-{c}", f"{a}/{b}-{c}"]
    if not dev:
        formats += [f"{a}-{b}-{c} x{_digits(r, 3)}", f"+1.{a}.{b}.{c}", f"+52 55 {_digits(r, 4)} {_digits(r, 4)}",
                    f"{b}-{c}"]
    return r.choice(formats)


def _email(r: random.Random, dev: bool) -> str:
    user = r.choice(["kealoha.m", "tshabalala22", "ozzy_begay", "quinn.rahimi", "bw.fitzgerald", "nagy.tomas"])
    host = r.choice(["inbox.example.net", "correo.example.mx", "uni-mail.example.ac.uk", "EXAMPLE.COM"])
    formats = [f"{user}+neuro@{host}", f"{user.upper()}@{host}", f"{user} at {host.split('.')[0]} dot com",
               f"{user}@{host}"]
    if not dev:
        formats += [f"{user}[at]{host}", f"{user} (at) {host}", f"{user}@{host.split('.')[0]}"]
    return r.choice(formats)


def _url(r: random.Random, dev: bool) -> str:
    formats = [f"facebook.com/{r.choice(['hakobyan.family', 'dottie.moody.7', 'mirtavo.b'])}",
               f"caringbridge.org/visit/{r.choice(['ulrichnagy', 'teamkeoni', 'prayersforpaavo'])}",
               f"gofundme.com/f/{r.choice(['help-adaeze-recover', 'dariusz-stroke-fund'])}",
               f"https://mychart.example-health.org/MyChart/Visit?csn={_digits(r, 9)}"]
    if not dev:
        formats += [f"instagram.com/{r.choice(['gunnar_h', 'lulu.mahlangu'])}", f"linkedin.com/in/{r.choice(['svetlana-sokolov', 'tadeo-quispe-md'])}",
                    f"bit.ly/{_caps(r, 2)}{_digits(r, 2)}xq"]
    return r.choice(formats)


def _ip(r: random.Random, dev: bool) -> str | tuple[str, tuple[int, int]]:
    h = lambda: f"{r.randint(1, 0xffff):x}"  # noqa: E731
    formats = [f"fe80::{h()}:{h()}:{h()}:{h()}", f"2607:f8b0:{h()}:{h()}::{h()}",
               "port",
               f"{r.randint(11, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"]
    if not dev:
        formats += [":".join(h() for _ in range(8)), f"::ffff:{r.randint(11, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.9"]
    value = r.choice(formats)
    if value == "port":  # the label covers the address, not its port
        value = f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        return f"{value}:{r.randint(1024, 9999)}", (0, len(value))
    return value


def _ssn(r: random.Random, dev: bool) -> str:
    a, b, c = r.randint(1, 665), r.randint(1, 99), r.randint(1, 9999)
    formats = [f"{a:03d}-{b:02d}-{c:04d}", f"{a:03d}.{b:02d}.{c:04d}", f"{a:03d} - {b:02d} - {c:04d}"]
    if not dev:
        formats += [f"{a:03d}/{b:02d}/{c:04d}", f"{a:03d} {b:02d}-{c:04d}"]
    return r.choice(formats)


def _mrn(r: random.Random, dev: bool) -> str:
    formats = [f"NC-{_digits(r, 7)}", f"{_caps(r, 2)}{_digits(r, 6)}", f"{_digits(r, 2)}-{_digits(r, 2)}-{_digits(r, 2)}",
               f"E{_digits(r, 9)}", f"{_digits(r, 3)}-{_digits(r, 4)}-{_digits(r, 1)}"]
    if not dev:
        formats += [f"H{_digits(r, 2)}-{_digits(r, 4)}", f"{_digits(r, 6)}"]
    return r.choice(formats)


def _account(r: random.Random, dev: bool) -> str:
    formats = [f"{_digits(r, 4)}-{_digits(r, 2)}-{_digits(r, 4)}", f"V{_digits(r, 8)}", f"{_digits(r, 12)}", f"A-{_digits(r, 5)}"]
    if not dev:
        formats += [f"{_digits(r, 3)} {_digits(r, 3)} {_digits(r, 3)}", f"EN{_digits(r, 7)}"]
    return r.choice(formats)


def _plan(r: random.Random, dev: bool) -> str:
    formats = [f"{_caps(r, 3)}{_digits(r, 9)}", f"{_digits(r, 1)}{_caps(r, 2)}{_digits(r, 1)}-{_caps(r, 2)}{_digits(r, 1)}-{_caps(r, 2)}{_digits(r, 2)}",
               f"{_digits(r, 9)}{r.choice('AB')}", f"GRP-{_digits(r, 5)}"]
    if not dev:
        formats += [f"{_caps(r, 1)}{_digits(r, 8)}-{_digits(r, 2)}", f"ZQ{_digits(r, 3)} {_digits(r, 4)}"]
    return r.choice(formats)


def _license(r: random.Random, dev: bool) -> str:
    formats = [f"RN-{_digits(r, 6)}", f"{_caps(r, 1)}{_digits(r, 3)}-{_digits(r, 4)}-{_digits(r, 4)}",
               f"{_caps(r, 2)}{_digits(r, 7)}", f"{_digits(r, 10)}"]
    if not dev:
        formats += [f"{_caps(r, 1)}{_digits(r, 2)} {_digits(r, 3)} {_digits(r, 3)}", f"PA{_digits(r, 5)}"]
    return r.choice(formats)


def _plate(r: random.Random, dev: bool) -> str:
    formats = [f"{r.randint(1, 9)}{_caps(r, 3)}{_digits(r, 3)}", f"{_caps(r, 3)} {_digits(r, 4)}", f"{_caps(r, 2)}{_digits(r, 1)} {_caps(r, 1)}{_digits(r, 2)}"]
    if not dev:
        formats += [f"{_caps(r, 2)}-{_digits(r, 2)}-{_caps(r, 2)}", f"{_digits(r, 3)} {_caps(r, 3)}"]
    return r.choice(formats)


def _vin(r: random.Random, dev: bool) -> str:
    vin = "".join(r.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(11)) + _digits(r, 6)
    return r.choice([vin, vin.lower()] if not dev else [vin])


def _device(r: random.Random, dev: bool) -> str:
    formats = [f"PJN{_digits(r, 6)}S", f"{_digits(r, 9)}", f"NNR-{_digits(r, 4)}-{_digits(r, 2)}",
               f"(01){_digits(r, 14)}(21){_caps(r, 2)}{_digits(r, 5)}"]
    if not dev:
        formats += [f"{_caps(r, 3)}{_digits(r, 7)}H", f"SN {_digits(r, 3)}-{_digits(r, 3)}"]
    return r.choice(formats)


def _other(r: random.Random, dev: bool) -> str:
    formats = [f"CT{_digits(r, 2)}-{_digits(r, 6)}", f"SP-{_digits(r, 2)}-{_digits(r, 5)}", f"{_digits(r, 4)}-NX",
               f"ORD{_digits(r, 8)}"]
    if not dev:
        formats += [f"{_caps(r, 2)}{_digits(r, 2)}-{_digits(r, 5)}", f"P{_digits(r, 3)}-{_caps(r, 2)}"]
    return r.choice(formats)


# slot -> (kind, value); a slot's value may depend on the half (HELDOUT-only formats)
SLOTS = {
    "name": ("name", lambda r, dev: r.choice([f for f, d in NAME_FORMATS if d or not dev])(r)),
    "given": ("name", lambda r, dev: _given(r)), "fam": ("name", lambda r, dev: _family(r)),
    "given_lc": ("name", lambda r, dev: _given(r).lower()),
    "nick": ("name", lambda r, dev: r.choice(NICK)),
    "inits": ("name", lambda r, dev: r.choice([f"{_initial(r)}.{_initial(r)}.", f"{_initial(r)}{_initial(r)}{_initial(r)}",
                                               f"{_initial(r)}{_initial(r)}"])),
    "street": ("address", _street), "town": ("city", lambda r, dev: r.choice(TOWNS)[0]),
    "town_lc": ("city", lambda r, dev: r.choice(TOWNS)[0].lower()),
    "abroad": ("city", lambda r, dev: r.choice(ABROAD)), "county": ("city", lambda r, dev: r.choice(COUNTIES)),
    "zip": ("zip", lambda r, dev: _zip(r)), "date": ("date", _date),
    "dom": ("date", lambda r, dev: _ordinal(r.randint(1, 28))),
    "month": ("date", lambda r, dev: r.choice(_MON)),
    "age": ("age", _age_value), "phone": ("phone", _phone),
    "pager": ("phone", lambda r, dev: r.choice([f"p{_digits(r, 4)}", f"{_digits(r, 1)}-{_digits(r, 4)}", f"#{_digits(r, 4)}"])),
    "email": ("email", _email), "url": ("url", _url), "ip": ("ip", _ip), "ssn": ("ssn", _ssn),
    "mrn": ("mrn", _mrn), "acct": ("account", _account), "plan": ("health_plan", _plan),
    "lic": ("license", _license), "plate": ("vehicle", _plate), "vin": ("vehicle", _vin), "dev": ("device", _device),
    "oid": ("other_id", _other),
}
SEX = ["F", "M"]

# (template, half): "D" in both halves, "H" only in HELDOUT. {slot} an identifier, {st} a state, {sx} F/M,
# {yr} a year, {n} a small number
PHI_TEMPLATES = [
    # names
    ("PATIENT: {name}", "D"), ("pt {name} seen in f/u", "D"), ("I saw {name} today in the movement clinic.", "D"),
    ("Collateral from her son {name}, who lives nearby.", "D"), ("Case reviewed with {name} (neuroradiology).", "D"),
    ("{name} presented to the ED after a fall.", "D"), ("Goes by \"{nick}\".", "D"), ("-- {inits}", "D"),
    ("RN {inits} notified of the result.", "D"), ("Note written by {given} {fam}, PGY-2.", "D"),
    ("Mrs {fam} and her husband {given} were present.", "D"), ("Daughter ({given_lc}) wants a call after rounds.", "D"),
    ("Msg left for {given} at home.", "D"), ("Neurology fellow: {name}", "D"), ("{fam} family requests a meeting.", "D"),
    ("Called pt's brother {given} {fam} re: transport.", "H"), ("Attestation: I agree with Dr {fam}'s findings.", "H"),
    ("Per {nick} (her grandson), she fell twice.", "H"), ("Pt's HCP is {name}.", "H"), ("/s/ {inits}", "H"),
    ("Seen jointly w/ {name}, neuro-oncology.", "H"), ("{given} reports the tremor is worse.", "H"),
    ("Interpreter {given} {fam} used for the visit.", "H"), ("Ms.{fam} declined the LP.", "H"),
    # places
    ("Address: {street}, {town}, {st} {zip}", "D"), ("Home: {street}; {town} {st} {zip}", "D"),
    ("Lives alone in {town_lc}.", "D"), ("Emigrated from {abroad} in {yr}.", "D"), ("Resides in {county}.", "D"),
    ("Transferred from an outside hospital in {town}.", "D"), ("Mail to {street}.", "D"),
    ("Works on a farm outside {town}, {st}.", "H"), ("Pt staying at daughter's house, {street}, {town}.", "H"),
    ("Grew up in {abroad}.", "H"), ("zip code {zip}", "H"), ("EMS brought pt from home in {town}.", "H"),
    # dates
    ("Admit date: {date}", "D"), ("Symptom onset {date} around noon.", "D"), ("Last known well {date}.", "D"),
    ("Seizure on {date}, then none.", "D"), ("Follow up scheduled for {date}.", "D"), ("MRI {date}: stable.", "D"),
    ("Seen by neurosurgery {date}.", "D"), ("Headaches since the {dom} of {month}.", "D"),
    ("Fell last Tuesday the {dom}.", "H"), ("EEG ({date}) without epileptiform discharges.", "H"),
    ("Started the new dose on {date} per pt.", "H"), ("D/C'd {date}.", "H"), ("Return {month} {dom}.", "H"),
    # ages
    ("{age} {sx} with new aphasia.", "D"), ("The patient is a {age} woman.", "D"), ("Age {age}.", "D"),
    ("He is {age}, still drives.", "D"), ("{age}, independent in ADLs.", "D"),
    ("A pleasant {age} gentleman.", "H"), ("She turned {age} last month.", "H"), ("pt {age} {sx}, h/o AF", "H"),
    # phones
    ("Call {phone} with results.", "D"), ("Daughter's cell {phone}.", "D"), ("Tel: {phone}", "D"),
    ("Pager {pager}", "D"), ("Reach the family at {phone}.", "D"),
    ("Contact number {phone}.", "H"), ("Page me, {pager}.", "H"), ("Wife can be reached on {phone}", "H"),
    # e-mail, urls, ips
    ("Email: {email}", "D"), ("Family updates sent to {email}.", "D"), ("Sent MRI images to {email}", "H"),
    ("Family blog: {url}", "D"), ("Updates posted at {url}.", "D"), ("Fundraiser at {url}", "H"),
    ("Video visit from {ip}.", "D"), ("Session IP {ip}", "D"), ("Portal login flagged from {ip}.", "H"),
    # numbers
    ("SSN: {ssn}", "D"), ("Social Security # {ssn}", "D"), ("ss# {ssn}", "H"),
    ("MRN {mrn}", "D"), ("Med Rec #: {mrn}", "D"), ("mrn: {mrn}", "D"), ("(MRN {mrn})", "H"), ("EMR # {mrn}", "H"),
    ("Encounter #: {acct}", "D"), ("Visit ID {acct}", "D"), ("Acct: {acct}", "D"), ("Billing #{acct}", "H"),
    ("BCBS ID {plan}", "D"), ("Medicare #: {plan}", "D"), ("Group # {plan}", "D"), ("Aetna member {plan}", "H"),
    ("NPI {lic}", "D"), ("Lic #: {lic}", "D"), ("DL# {lic}", "D"), ("Driver lic. {lic}", "H"),
    ("License plate {plate}", "D"), ("VIN: {vin}", "D"), ("plate: {plate}", "D"), ("Tag # {plate}", "H"),
    ("Car ({plate}) left in the ED lot.", "H"), ("vehicle VIN {vin}", "H"),
    ("Pacemaker SN: {dev}", "D"), ("ICD serial number {dev}", "D"), ("DBS IPG serial no. {dev}", "D"),
    ("Insulin pump serial # {dev}", "H"), ("VNS generator S/N {dev}", "H"),
    ("Accession # {oid}", "D"), ("Path #: {oid}", "D"), ("Research subject {oid}", "D"), ("Order #{oid}", "H"),
    ("Specimen {oid}", "H"),
]
STATES = ["WA", "OH", "MN", "GA", "AZ", "KY", "ME", "NM", "IA", "ND"]

# ------------------------------------------------------------------------------------------- traps

TRAP_EPONYMS = ["Hoehn and Yahr stage", "Spetzler-Martin grade", "Hunt-Hess grade", "modified Fisher scale", "Rankin",
                "Berg Balance Scale", "Barthel Index", "Karnofsky", "Ashworth", "Hachinski score", "Epworth Sleepiness Scale",
                "Folstein", "Boston Naming Test", "Los Angeles Motor Scale", "Cincinnati Prehospital Stroke Scale",
                "Montreal Cognitive Assessment", "McDonald criteria", "Lennox-Gastaut syndrome", "Dravet syndrome",
                "Rett syndrome", "Angelman syndrome", "Prader-Willi syndrome", "Kearns-Sayre syndrome", "Leigh syndrome",
                "Tay-Sachs disease", "Niemann-Pick disease", "Fabry disease", "Gaucher disease", "Pompe disease",
                "Duchenne dystrophy", "Becker dystrophy", "Emery-Dreifuss dystrophy", "Bickerstaff encephalitis",
                "Susac syndrome", "Behcet disease", "Devic disease", "Binswanger disease", "Pick disease",
                "Fahr disease", "Kluver-Bucy syndrome", "Anton syndrome", "Gerstmann syndrome", "Balint syndrome",
                "Foster Kennedy syndrome", "Parinaud syndrome", "Chaddock sign", "Oppenheim sign", "Hoover sign",
                "Spurling test", "Trendelenburg gait", "Froment sign", "Beevor sign", "Cheyne-Stokes respiration",
                "Kussmaul breathing", "Battle sign", "Cushing triad", "Virchow-Robin spaces", "Meyer loop",
                "Sylvian fissure", "Heschl gyrus", "Purkinje cells", "Schwann cells", "Brodmann area 44",
                "foramen of Monro", "Meckel cave", "vein of Galen", "Hashimoto encephalopathy", "Moyamoya disease",
                "Tolosa-Hunt syndrome", "Wolff-Parkinson-White", "Takayasu arteritis", "Sjogren syndrome",
                "Graves disease", "Crohn disease", "Addison disease", "Kawasaki disease", "Wada test",
                "Mallampati class", "Brunnstrom stage", "Kurtzke scale", "Cobb angle", "Chvostek sign",
                "Lyme disease", "West Nile virus", "St. Louis encephalitis", "Powassan virus", "Coxsackie virus",
                "Rocky Mountain spotted fever", "Japanese encephalitis", "Hallervorden-Spatz disease",
                "Marchiafava-Bignami disease", "Holmes tremor", "Dejerine-Roussy syndrome", "Ondine curse",
                "Brown-Vialetto-Van Laere syndrome", "Kennedy disease", "Hirayama disease", "Morvan syndrome",
                "Vogt-Koyanagi-Harada"]
TRAP_DRUGS = ["Nuedexta", "Vyvgart", "Soliris", "Ultomiris", "Enspryng", "Uplizna", "Zeposia", "Mayzent",
              "Ponvory", "Aubagio", "Briumvi", "Lemtrada", "Qulipta", "Ubrelvy", "Vyepti", "Reyvow", "Epidiolex",
              "Fintepla", "Diacomit", "Ztalmy", "Nayzilam", "Valtoco", "Banzel", "Sabril", "Aptiom", "Trileptal",
              "Zonegran", "Xadago", "Nourianz", "Ongentys", "Inbrija", "Gocovri", "Duopa", "Neupro", "Mirapex",
              "Requip", "Zanaflex", "Lioresal", "Dantrium", "Xeomin", "Dysport", "Evrysdi", "Zolgensma", "Qalsody",
              "Rilutek", "Onpattro", "Skyclarys", "Kisunla", "Belsomra", "Wakix", "Xywav", "Sunosi", "Nuvigil",
              "eptinezumab", "ubrogepant", "lasmiditan", "atogepant", "fremanezumab", "cenobamate", "brivaracetam",
              "perampanel", "clobazam", "stiripentol", "fenfluramine", "ganaxolone", "vigabatrin", "rufinamide",
              "eslicarbazepine", "zonisamide", "ethosuximide", "safinamide", "istradefylline", "opicapone",
              "amantadine", "pramipexole", "ropinirole", "rotigotine", "apomorphine", "deutetrabenazine",
              "valbenazine", "pimavanserin", "riluzole", "tofersen", "risdiplam", "eculizumab", "efgartigimod",
              "satralizumab", "inebilizumab", "ozanimod", "siponimod", "teriflunomide", "cladribine",
              "alemtuzumab", "ublituximab", "lecanemab", "donanemab", "suvorexant", "pitolisant", "modafinil",
              "baclofen", "tizanidine", "dantrolene", "nimodipine", "nicardipine", "labetalol", "mannitol",
              "enoxaparin", "dabigatran", "ticagrelor", "amitriptyline", "venlafaxine", "verapamil", "candesartan",
              "riboflavin", "acyclovir", "ceftriaxone", "vancomycin", "rituximab", "tocilizumab", "Keflex",
              "Florinef", "Midodrine", "Mestinon Timespan", "Horizant", "Gralise", "Amrix", "Nucynta", "Belbuca"]
GENES = ["anti-Yo", "anti-Hu", "anti-Ri", "anti-Ma2", "anti-Tr (DNER)", "LGI1", "CASPR2", "NMDAR", "GABA-B", "AMPAR",
         "DPPX", "CV2/CRMP5", "amphiphysin", "VGCC", "AChR binding", "MuSK", "LRP4", "GQ1b", "GM1", "SOD1", "C9orf72",
         "TARDBP", "FMR1", "PMP22", "MFN2", "SCN1A", "KCNQ2", "CDKL5", "PCDH19", "MECP2", "TSC2", "NF1", "APOE e4/e4",
         "LRRK2 G2019S", "GBA1", "PRKN", "PINK1", "SNCA", "MAPT", "GRN", "PSEN1", "NOTCH3", "COL4A1", "HLA-B*15:02",
         "HLA-DQB1*06:02", "IDH1 R132H", "MGMT", "1p/19q", "ATRX", "TERT", "H3 K27M", "EGFRvIII", "BRAF V600E"]
HEADERS = ["CHIEF COMPLAINT:", "Assessment and Plan:", "REVIEW OF SYSTEMS:", "Social History:", "Family History:",
           "IMPRESSION:", "Disposition: Home with Services", "Code Status: Full Code", "Allergies: NKDA",
           "Hospital Course:", "Physical Exam:", "Mental Status:", "Cranial Nerves:", "Motor:", "Sensory:",
           "Coordination:", "Gait:", "Labs/Imaging:", "Interval History:", "Neuro Checks: q4h", "Diet: Dysphagia 2"]
SERVICES = ["Palliative Care", "Social Work", "Neuroradiology", "Neurohospitalist", "Vascular Neurology",
            "Neuro-Ophthalmology", "Speech Language Pathology", "Nutrition Services", "Spiritual Care",
            "Interventional Radiology", "Sleep Medicine", "Epilepsy Monitoring", "Rehab Medicine", "Wound Care"]
ROLE_CUES = ["Discussed with", "Seen by", "Spoke with", "Signed by", "Referred by", "Attending", "Contact", "Provider",
             "Evaluated by", "d/w", "cc"]
PROTECTED = TRAP_EPONYMS + TRAP_DRUGS + GENES + SERVICES

CLEAN_TEMPLATES = [  # {ep} a trap eponym, {dr}/{dr2} trap drugs, {gn}/{gn2} genes or antibodies, {hd} a header,
    # {sv} a service, {cue} a role word, {n}/{m} small numbers, {yr} a year
    "{hd}", "{hd} {ep} considered.", "Known {ep} since {yr}.", "{ep} negative.", "No features of {ep}.",
    "Concern for {ep}; workup sent.", "{dr} {n}00 mg daily, titrating to {m}00 mg.", "Switched {dr} to {dr2}.",
    "{dr} infusion every {m} months.", "Trial of {dr}, {n} mg/kg/day divided BID.", "{dr} held for LFTs 3x ULN.",
    "Paraneoplastic panel: {gn} and {gn2} negative.", "Genetic testing: {gn} variant of uncertain significance.",
    "{gn} positive; {gn2} pending.", "{cue} {sv} regarding goals of care.", "{cue} {sv}.",
    "Recommendations from {sv} appreciated.", "ANA 1:{n}60, speckled; RF negative.",
    "Na 13{n}, K {m}.{n}, Cl 10{n}, HCO3 2{m}, BUN 1{n}, Cr 0.{n}.", "ESR {n}{m}, CRP {m}.{n}, CK 2,{n}50.",
    "IVIG 2 g/kg over {m} days.", "PLEX x{m} exchanges.", "NIHSS {n}, ASPECTS {m}, ICH score {m}.",
    "UPDRS-III {n}{m}, Hoehn and Yahr {m}.", "ALSFRS-R {m}{n}/48, FVC {n}0%.", "MG-ADL {n}, QMG 1{m}.",
    "HIT-6 6{n}, MIDAS 2{m}.", "MMSE 2{m}/30, CDR 0.5.", "STOP-BANG {m}; AHI {n}{m}.",
    "C{m}-C{n} disc osteophyte complex; L{m}-S1 foraminal stenosis.", "Occlusion of the M{m} segment; P{m} patent.",
    "Seizure-free since {yr}.", "Diagnosed in {yr}; relapse in {yr}.", "Per AAN {yr} guideline.",
    "Spring {yr} flare treated with steroids.", "In {yr} she had a DVT.", "EEG {n} Hz posterior dominant rhythm.",
    "Tmax 38.{n} C; HR 10{n}; RR 1{m}.", "GCS 1{m}, pupils {m} mm and reactive.", "Strength {m}/5 at the hip flexors.",
    "Vitamin B1 100 mg daily, folate 1 mg.", "JCV index 0.{n}{m}; Ki-67 {n}%.", "Dose {n}.{m} mg/kg IV q8h.",
    "Wife Present at bedside.", "Daughter Updated by phone.", "Patient Education completed.",
    "Nurse Navigator to schedule.", "Son And daughter at bedside.", "Mother Tongue: Spanish; interpreter used.",
]


def _fill(template: str, r: random.Random, dev: bool, labels: list, offset: int, deal) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(template[pos:m.start()])
        slot = m.group(1)
        if slot in SLOTS:
            kind, make = SLOTS[slot]
            value = make(r, dev)  # a string, labelled whole, or (string, (start, end) of its label)
            value, (a, b) = value if isinstance(value, tuple) else (value, (0, len(value)))
            start = offset + sum(map(len, out))
            labels.append((kind, start + a, start + b))
        else:
            value = deal(slot)
        out.append(value)
        pos = m.end()
    return "".join(out) + template[pos:]


class _Traps:
    """Clinical sentences with trap terms; every trap eponym, drug and gene comes round in turn."""

    def __init__(self, r: random.Random):
        self.r = r
        self.decks = {k: [] for k in ("ep", "dr", "gn", "sv")}
        self.items = {"ep": TRAP_EPONYMS, "dr": TRAP_DRUGS, "gn": GENES, "sv": SERVICES}

    def draw(self, slot: str) -> str:
        r = self.r
        base = slot.rstrip("2")
        if base in self.items:
            if not self.decks[base]:
                self.decks[base] = r.sample(self.items[base], len(self.items[base]))
            return self.decks[base].pop()
        return {"hd": lambda: r.choice(HEADERS), "cue": lambda: r.choice(ROLE_CUES), "n": lambda: str(r.randint(1, 9)),
                "m": lambda: str(r.randint(1, 5)), "yr": lambda: str(r.randint(1990, 2025)),
                "st": lambda: r.choice(STATES), "sx": lambda: r.choice(SEX)}[slot]()

    def sentence(self) -> str:
        return _fill(self.r.choice(CLEAN_TEMPLATES), self.r, True, [], 0, self.draw)


def holdout_notes(half: str, n: int, seed: int | None = None) -> list[Note]:
    """``n`` notes of ``half`` (``DEV`` or ``HELDOUT``), each with 8 identifier sentences (templates dealt in
    turn) among 8 trap sentences."""
    dev = half == DEV
    r = random.Random(SEEDS[half] if seed is None else seed)
    templates = [t for t, h in PHI_TEMPLATES if h == "D" or not dev]
    traps, deck = _Traps(r), []
    notes = []
    for _ in range(n):
        text, labels = "", []
        for i in range(16):
            if i % 2 == 0:
                if not deck:
                    deck = r.sample(templates, len(templates))
                sentence = _fill(deck.pop(), r, dev, labels, len(text), traps.draw)
            else:
                sentence = traps.sentence()
            text += sentence + ("\n" if i % 3 == 2 or sentence.endswith(":") else " ")
        notes.append(Note(text.rstrip(), labels))
    return notes


def holdout_clean_notes(half: str, n: int, seed: int | None = None) -> list[str]:
    """``n`` identifier-free notes of 12-20 trap sentences, one per line or run together."""
    r = random.Random(SEEDS[half] + 1 if seed is None else seed)
    traps = _Traps(r)
    return ["".join(traps.sentence() + r.choice(["\n", " "]) for _ in range(r.randint(12, 20))).rstrip()
            for _ in range(n)]


def traps_hit(texts: list[str], spans: list[list]) -> list[str]:
    """Trap terms (``PROTECTED``) of ``texts`` that a span (start, end, ...) touches."""
    hit = []
    for text, found in zip(texts, spans):
        for term in PROTECTED:
            for m in re.finditer(re.escape(term), text):
                if any(s[0] < m.end() and m.start() < s[1] for s in found):
                    hit.append(term)
    return hit
