"""Embedded default task "demo": an offline, deterministic adverse-drug-event causality task.

Modelled on CRADE (JMED-LLM's case-report ADE task): each row is a short English case snippet
naming a drug and an adverse event, followed by the question how likely the drug caused the event
and four ordered options (A. unrelated, B. unlikely, C. probable, D. certain). The gold label
follows from the cues in the snippet by the rule in ``RULE_DOC``; ``label_case`` implements it on a
cue record (``Cues``), and every generated row's label is ``label_case`` of the cues it was rendered
from. The same ``(n_examples, seed, tag_shares)`` always gives the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from scd_pipeline.errors import ConfigError

LABELS = ("unrelated", "unlikely", "probable", "certain")
LETTERS = ("A", "B", "C", "D")
TAGS = ("single_cue", "agreeing_cues", "temporal", "conflicting")
ONSET_WINDOW_DAYS = 28          # onset 0..28 days after the first dose is plausible
DISTRACTOR_SHARE = 0.4          # share of short cases (at most one cue sentence) given a distractor
MAX_SNIPPET_TOKENS = 64         # SmolLM2 tokens of the case snippet (checked by the tests)
MAX_CUE_SENTENCES = 3           # sentences after the opening and the event one, distractor included

RULE_DOC = """\
Labelling rule of the demo task (a points score in the spirit of the Naranjo scale, read into
WHO-UMC-like ordered categories). A case states some of five cues; a cue it does not state
scores 0.

1. Time to onset, in days from the first dose to the event (stated in days, weeks, months or as
   hospital days):
   - the event began before the first dose: the drug cannot be the cause, so the case is
     "unrelated" whatever else it says;
   - 0 to 28 days after the first dose (the plausible window): +2;
   - more than 28 days after the first dose: -2.
2. Dechallenge (the drug was stopped): the event improved +1; it persisted -1; the drug was
   continued 0.
3. Rechallenge (the drug was given again): the event recurred +4; it did not recur -2; no
   rechallenge 0.
4. Alternative cause: another plausible cause is present -2; other causes were excluded +1.
5. Dose response: the event changed with the dose +1; it did not change when the dose changed -1.

The label follows from the total: -4 or less -> unrelated; -3 to 1 -> unlikely; 2 or 3 ->
probable; 4 or more -> certain.

Cues conflict when at least one scores above 0 and another below 0 (an event that began before
the first dose counts as below 0).

Sub-categories (tag), each with its four labels in equal numbers (up to rounding):
- single_cue (easy): exactly one cue, said plainly.
- agreeing_cues (medium): two to four cues that all point the same way; an onset, if given, is
  far from the window's edge.
- temporal (hard): the onset is a number near the 28-day edge (in days, in weeks, or as two
  hospital days to subtract; an onset before the first dose is worded with "after" and "earlier"
  as often as one after it), with at most two cues agreeing with it: reading the number decides.
- conflicting (hard): two to four cues pointing both ways, to be weighed by their points.
tag_shares gives each tag's share of the rows (rounded to whole rows, summing to n_examples); the
rows tagged conflicting are exactly the rows whose cues conflict. The default (config.yaml
data.demo.tag_shares) leans to single_cue: from an even mix a short SmolLM2-135M run learns nothing
but the label prior, since one cue's label changes with the cues beside it; with single cues in the
majority it learns them first, then the rest. Cases with
at most one cue sentence get one irrelevant history sentence (a distractor) 40% of the time,
about a fifth of all cases.
"""

Dechallenge = Literal["improved", "persisted", "not_done", "not_stated"]
Rechallenge = Literal["recurred", "no_recurrence", "not_done", "not_stated"]
AlternativeCause = Literal["present", "excluded", "not_stated"]
DoseResponse = Literal["dose_related", "no_change", "not_stated"]


@dataclass(frozen=True)
class Cues:
    """What a case states about one drug and one adverse event (``not_stated`` scores 0)."""

    onset_days: int | None = None   # days from the first dose to the event; < 0: began before it
    dechallenge: Dechallenge = "not_stated"
    rechallenge: Rechallenge = "not_stated"
    alternative_cause: AlternativeCause = "not_stated"
    dose_response: DoseResponse = "not_stated"


CUE_POINTS: dict[str, dict[str, int]] = {
    "dechallenge": {"improved": 1, "persisted": -1, "not_done": 0, "not_stated": 0},
    "rechallenge": {"recurred": 4, "no_recurrence": -2, "not_done": 0, "not_stated": 0},
    "alternative_cause": {"present": -2, "excluded": 1, "not_stated": 0},
    "dose_response": {"dose_related": 1, "no_change": -1, "not_stated": 0},
}
ONSET_IN_WINDOW_POINTS = 2
ONSET_LATE_POINTS = -2
# Lowest total of each label, from "certain" down; anything lower is "unrelated".
LABEL_THRESHOLDS = ((4, 3), (2, 2), (-3, 1))


def onset_before_first_dose(cues: Cues) -> bool:
    """True when the event began before the first dose (the rule's veto: "unrelated")."""
    return cues.onset_days is not None and cues.onset_days < 0


def cue_points(cues: Cues) -> dict[str, int]:
    """Points of each cue under RULE_DOC; an onset before the first dose scores 0 here (veto)."""
    if cues.onset_days is None or cues.onset_days < 0:
        onset = 0
    elif cues.onset_days <= ONSET_WINDOW_DAYS:
        onset = ONSET_IN_WINDOW_POINTS
    else:
        onset = ONSET_LATE_POINTS
    points = {"onset": onset}
    for cue, table in CUE_POINTS.items():
        points[cue] = table[getattr(cues, cue)]
    return points


def case_score(cues: Cues) -> int:
    """Total points of a case (ignores the veto; see ``label_case``)."""
    return sum(cue_points(cues).values())


def cues_conflict(cues: Cues) -> bool:
    """True when a cue scoring above 0 meets one scoring below 0 or an onset before the first dose."""
    points = cue_points(cues).values()
    has_negative = onset_before_first_dose(cues) or any(p < 0 for p in points)
    return has_negative and any(p > 0 for p in points)


def label_case(cues: Cues) -> int:
    """Index into LABELS of the gold label of a cue record, by the rule in RULE_DOC."""
    if onset_before_first_dose(cues):
        return 0
    score = case_score(cues)
    for lowest_total, label in LABEL_THRESHOLDS:
        if score >= lowest_total:
            return label
    return 0


# ----------------------------------------------------------------------------------------------
# Vocabulary of the case snippets. Drugs carry a short indication; events an introducing noun
# phrase and a short definite reference used in later sentences and in the question.

DRUGS = (
    ("amoxicillin", "sinusitis"), ("ciprofloxacin", "cystitis"), ("doxycycline", "acne"),
    ("clarithromycin", "pneumonia"), ("trimethoprim", "a urinary infection"),
    ("nitrofurantoin", "cystitis"), ("vancomycin", "cellulitis"), ("isoniazid", "tuberculosis"),
    ("rifampicin", "tuberculosis"), ("metformin", "diabetes"), ("atorvastatin", "high cholesterol"),
    ("simvastatin", "high cholesterol"), ("lisinopril", "hypertension"),
    ("enalapril", "heart failure"), ("amlodipine", "hypertension"), ("losartan", "hypertension"),
    ("furosemide", "oedema"), ("spironolactone", "heart failure"), ("warfarin", "atrial fibrillation"),
    ("apixaban", "atrial fibrillation"), ("clopidogrel", "angina"), ("allopurinol", "gout"),
    ("carbamazepine", "epilepsy"), ("lamotrigine", "epilepsy"), ("phenytoin", "seizures"),
    ("valproate", "bipolar disorder"), ("levetiracetam", "epilepsy"), ("sertraline", "depression"),
    ("citalopram", "anxiety"), ("mirtazapine", "depression"), ("quetiapine", "schizophrenia"),
    ("olanzapine", "schizophrenia"), ("haloperidol", "delirium"), ("lithium", "bipolar disorder"),
    ("omeprazole", "reflux"), ("ibuprofen", "back pain"), ("naproxen", "arthritis"),
    ("diclofenac", "knee pain"), ("methotrexate", "psoriasis"), ("azathioprine", "Crohn's disease"),
    ("prednisolone", "asthma"), ("tramadol", "hip pain"), ("gabapentin", "neuropathic pain"),
    ("levothyroxine", "hypothyroidism"), ("hydroxychloroquine", "lupus"),
)
EVENTS = (
    ("a skin rash", "the rash"), ("hives", "the hives"), ("angioedema", "the angioedema"),
    ("acute hepatitis", "the hepatitis"), ("jaundice", "the jaundice"),
    ("a dry cough", "the cough"), ("hyponatraemia", "the low sodium"),
    ("hyperkalaemia", "the high potassium"), ("muscle pain", "the muscle pain"),
    ("a tremor", "the tremor"), ("dizziness", "the dizziness"), ("nausea", "the nausea"),
    ("diarrhoea", "the diarrhoea"), ("ankle swelling", "the swelling"),
    ("a low platelet count", "the low platelets"), ("neutropenia", "the neutropenia"),
    ("acute kidney injury", "the kidney injury"), ("pancreatitis", "the pancreatitis"),
    ("confusion", "the confusion"), ("insomnia", "the insomnia"), ("hair loss", "the hair loss"),
    ("blurred vision", "the blurred vision"), ("a headache", "the headache"),
    ("palpitations", "the palpitations"), ("gum bleeding", "the bleeding"),
)
ALTERNATIVE_CAUSES = (
    "a viral infection", "recent surgery", "alcohol use", "kidney disease", "a recent fever",
    "liver disease", "dehydration", "a new supplement",
)
DISTRACTOR_FACTS = (
    "had an appendectomy at age {n}", "is a retired {job}", "had eye surgery {n} years ago",
    "drinks {n_small} cups of coffee a day", "lives with {poss} daughter",
    "walks {n_small} km most days", "broke {poss} wrist {n} years ago", "works as a {job}",
    "quit smoking {n} years ago", "has {n_small} grandchildren",
)
JOBS = ("teacher", "farmer", "nurse", "driver", "chef", "clerk", "builder", "librarian")


@dataclass(frozen=True)
class _Case:
    """One generated case: its cue record (the ground truth) and the rendered snippet."""

    tag: str
    cues: Cues
    snippet: str
    drug: str
    event_reference: str


# ----------------------------------------------------------------------------------------------
# Proposals: random cue records of one tag, paired with how the onset is written. The generator
# keeps a proposal only when its label is the wanted one and it fits the tag's conflict rule.

_VALUES_BY_SIGN = {
    "dechallenge": {1: "improved", -1: "persisted"},
    "rechallenge": {1: "recurred", -1: "no_recurrence"},
    "alternative_cause": {1: "excluded", -1: "present"},
    "dose_response": {1: "dose_related", -1: "no_change"},
}
_NON_ONSET_CUES = tuple(_VALUES_BY_SIGN)
_ALL_CUES = ("onset",) + _NON_ONSET_CUES


def _clear_onset(rng: random.Random, sign: int) -> tuple[int, str]:
    """An onset far from the window's edge (easy and medium tags)."""
    if sign > 0:
        style = rng.choice(("same_day", "days", "days", "days", "weeks"))
        if style == "weeks":
            return 7 * rng.randint(1, 2), style
        return (0, style) if style == "same_day" else (rng.choice((1, 2, 3, 4, 5, 6, 7, 10, 14)), style)
    if rng.random() < 0.5:
        return -rng.randint(1, 14), "before_words"
    return 30 * rng.randint(2, 9), "months"


def _near_edge_onset(rng: random.Random, kind: str) -> tuple[int, str]:
    """An onset near the 28-day edge, written so that reading the numbers decides (temporal)."""
    style = rng.choice(("days", "weeks", "hospital_days"))
    if style == "weeks":
        weeks = {"window": rng.randint(2, 4), "late": rng.randint(5, 8), "before": -rng.randint(1, 3)}
        return 7 * weeks[kind], "weeks"
    if kind == "before":
        return -rng.randint(1, 9), style
    if kind == "window":
        return rng.randint(12, ONSET_WINDOW_DAYS), style
    return rng.randint(ONSET_WINDOW_DAYS + 1, 45), style


def _any_onset(rng: random.Random) -> tuple[int, str]:
    """Any onset (conflicting tag): clear or near the edge, either way."""
    kind = rng.choice(("window", "window", "late", "before"))
    if rng.random() < 0.5:
        return _near_edge_onset(rng, kind)
    return _clear_onset(rng, 1 if kind == "window" else -1)


def _propose_single_cue(rng: random.Random) -> tuple[Cues, str]:
    cue = rng.choice(_ALL_CUES)
    sign = rng.choice((1, -1))
    if cue == "onset":
        days, style = _clear_onset(rng, sign)
        return Cues(onset_days=days), style
    return Cues(**{cue: _VALUES_BY_SIGN[cue][sign]}), "unstated"


def _pick_cues(rng: random.Random, counts: tuple[int, ...]) -> tuple[str, ...]:
    """Names of the informative cues of a case; four only with the onset (length budget)."""
    count = rng.choice(counts)
    if count == 4:
        return ("onset",) + tuple(rng.sample(_NON_ONSET_CUES, 3))
    return tuple(rng.sample(_ALL_CUES, count))


def _zero_point_mentions(rng: random.Random, chosen: tuple[str, ...]) -> dict[str, str]:
    """Stated cues that score 0 (drug continued, no rechallenge): text without a direction."""
    room = MAX_CUE_SENTENCES - sum(cue != "onset" for cue in chosen)
    mentions = {cue: "not_done" for cue in ("dechallenge", "rechallenge")
                if cue not in chosen and rng.random() < 0.2}
    return dict(list(mentions.items())[:max(room, 0)])


def _propose_agreeing_cues(rng: random.Random) -> tuple[Cues, str]:
    sign = rng.choice((1, -1))
    chosen = _pick_cues(rng, (2, 2, 3, 3, 4))
    fields: dict = _zero_point_mentions(rng, chosen)
    style = "unstated"
    for cue in chosen:
        if cue == "onset":
            fields["onset_days"], style = _clear_onset(rng, sign)
        else:
            fields[cue] = _VALUES_BY_SIGN[cue][sign]
    return Cues(**fields), style


def _propose_temporal(rng: random.Random) -> tuple[Cues, str]:
    kind = rng.choice(("window", "late", "before"))
    days, style = _near_edge_onset(rng, kind)
    sign = 1 if kind == "window" else -1
    chosen = tuple(rng.sample(_NON_ONSET_CUES, rng.choice((0, 0, 1, 2))))
    fields: dict = _zero_point_mentions(rng, chosen)
    for cue in chosen:
        fields[cue] = _VALUES_BY_SIGN[cue][sign]
    return Cues(onset_days=days, **fields), style


def _propose_conflicting(rng: random.Random) -> tuple[Cues, str]:
    chosen = _pick_cues(rng, (2, 3, 3, 4))
    fields: dict = {}
    style = "unstated"
    for cue in chosen:
        if cue == "onset":
            fields["onset_days"], style = _any_onset(rng)
        else:
            fields[cue] = _VALUES_BY_SIGN[cue][rng.choice((1, -1))]
    return Cues(**fields), style


_PROPOSERS = {
    "single_cue": _propose_single_cue,
    "agreeing_cues": _propose_agreeing_cues,
    "temporal": _propose_temporal,
    "conflicting": _propose_conflicting,
}


# ----------------------------------------------------------------------------------------------
# Rendering: several templates per cue; sentence order and wording vary per case.

@dataclass(frozen=True)
class _Patient:
    age: int
    noun: str        # woman | man
    pronoun: str     # she | he
    possessive: str  # her | his


def _article(age: int) -> str:
    return "An" if age == 18 or 80 <= age <= 89 else "A"


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _opening(rng: random.Random, patient: _Patient, drug: str, indication: str | None,
             admission_day: int | None) -> str:
    who = f"{_article(patient.age)} {patient.age}-year-old {patient.noun}"
    if admission_day is not None:
        return f"{who} was given {drug} from hospital day {admission_day}."
    reason = f" for {indication}" if indication and rng.random() < 0.5 else ""
    return rng.choice((
        f"{who} started {drug}{reason}.",
        f"{who} was prescribed {drug}{reason}.",
        f"{who} began taking {drug}{reason}.",
        f"{_capital(drug)} was started in {who.lower()}{reason}.",
    ))


def _count(number: int, unit: str) -> str:
    return f"{number} {unit}" if number == 1 else f"{number} {unit}s"


def _event_sentence(rng: random.Random, patient: _Patient, event: str, days: int | None,
                    style: str, admission_day: int | None) -> str:
    """The sentence that introduces the event and, unless unstated, its time to onset."""
    she = patient.pronoun
    if style == "unstated":
        return rng.choice((f"{_capital(she)} presented with {event}.", f"{_capital(event)} was reported.",
                           f"{_capital(she)} was seen for {event}."))
    if style == "hospital_days":
        return rng.choice((f"{_capital(event)} appeared on day {admission_day + days}.",
                           f"On day {admission_day + days} {she} developed {event}."))
    if style == "same_day":
        return rng.choice((f"Within hours of the first dose {she} developed {event}.",
                           f"{_capital(event)} began on the day of the first dose."))
    if style == "before_words":  # said plainly (easy and medium tags)
        return rng.choice((f"{_capital(event)} was already present before the first dose.",
                           f"{_capital(she)} had {event} before the first dose.",
                           f"{_capital(she)} had {event} {_count(-days, 'day')} before the first dose."))
    number, unit = {"days": (abs(days), "day"), "weeks": (abs(days) // 7, "week"),
                    "months": (days // 30, "month")}[style]
    assert number * {"day": 1, "week": 7, "month": 30}[unit] == abs(days), (days, style)
    span = _count(number, unit)
    if days < 0:
        # Worded with "after" and "earlier" as often as the onsets after the first dose are.
        return rng.choice((f"{_capital(event)} had appeared {span} earlier.",
                           f"The drug was started {span} after {event} appeared.",
                           f"{_capital(she)} had {event} {span} before the first dose."))
    return rng.choice((f"{_capital(span)} later {she} developed {event}.",
                       f"After {span} of treatment {she} developed {event}.",
                       f"{_capital(she)} developed {event} {span} after the first dose.",
                       f"{_capital(event)} appeared; the drug had been started {span} earlier."))


# "{Ref}" is the event's definite reference capitalised; the drug is named only in the opening
# (drug names cost SmolLM2 up to 6 tokens each).
CUE_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("dechallenge", "improved"): ("{Ref} resolved after the drug was stopped.",
                                  "It cleared once the drug was withdrawn.",
                                  "Stopping the drug led to recovery.",
                                  "It improved after withdrawal."),
    ("dechallenge", "persisted"): ("{Ref} persisted after the drug was stopped.",
                                   "It did not improve after withdrawal.",
                                   "Stopping the drug brought no improvement."),
    ("dechallenge", "not_done"): ("The drug was continued.", "Treatment was not interrupted."),
    ("rechallenge", "recurred"): ("It recurred when the drug was restarted.",
                                  "On re-exposure {ref} returned.",
                                  "Rechallenge reproduced it."),
    ("rechallenge", "no_recurrence"): ("It did not recur on re-exposure.",
                                       "Re-exposure caused no recurrence.",
                                       "Rechallenge was uneventful."),
    ("rechallenge", "not_done"): ("No rechallenge was attempted.", "The drug was not given again."),
    ("alternative_cause", "present"): ("{Cause} could also explain it.",
                                       "{She} was also taking {other_drug}.",
                                       "{Cause} is another likely cause."),
    ("alternative_cause", "excluded"): ("Other causes were ruled out.",
                                        "No other drug or illness could explain it.",
                                        "Tests excluded other causes."),
    ("dose_response", "dose_related"): ("It worsened when the dose was raised.",
                                        "It eased after the dose was halved.",
                                        "It improved on a lower dose."),
    ("dose_response", "no_change"): ("Changing the dose made no difference.",
                                     "It was unchanged when the dose was lowered.",
                                     "A higher dose did not worsen it."),
}


def _cue_sentence(rng: random.Random, cue: str, value: str, patient: _Patient, drug: str,
                  reference: str) -> str:
    template = rng.choice(CUE_TEMPLATES[(cue, value)])
    fields = {"Ref": _capital(reference), "ref": reference, "She": _capital(patient.pronoun)}
    if "{Cause}" in template:
        fields["Cause"] = _capital(rng.choice(ALTERNATIVE_CAUSES))
    if "{other_drug}" in template:
        fields["other_drug"] = rng.choice([name for name, _ in DRUGS if name != drug])
    return template.format(**fields)


def _distractor(rng: random.Random, patient: _Patient) -> str:
    fact = rng.choice(DISTRACTOR_FACTS).format(
        n=rng.randint(2, min(40, patient.age - 8)), n_small=rng.randint(2, 6),
        job=rng.choice(JOBS), poss=patient.possessive)
    return f"{_capital(patient.pronoun)} {fact}."


def _render(rng: random.Random, cues: Cues, onset_style: str) -> tuple[str, str, str]:
    """Snippet text, drug name and event reference of a cue record."""
    drug, indication = rng.choice(DRUGS)
    event, reference = rng.choice(EVENTS)
    sex = rng.choice(("woman", "man"))
    patient = _Patient(age=rng.randint(18, 90), noun=sex, pronoun="she" if sex == "woman" else "he",
                       possessive="her" if sex == "woman" else "his")
    admission_day = None
    if onset_style == "hospital_days":
        # The event's hospital day must be at least 1.
        admission_day = rng.randint(max(1, 1 - cues.onset_days), 12 + max(0, -cues.onset_days))
    sentences = [_event_sentence(rng, patient, event, cues.onset_days, onset_style, admission_day)]
    stated = [(cue, getattr(cues, cue)) for cue in _NON_ONSET_CUES if getattr(cues, cue) != "not_stated"]
    rng.shuffle(stated)
    # Any order, except that a dechallenge is told before a rechallenge (the drug is stopped first).
    cue_names = [cue for cue, _ in stated]
    if "dechallenge" in cue_names and "rechallenge" in cue_names:
        first, second = sorted((cue_names.index("dechallenge"), cue_names.index("rechallenge")))
        stated[first], stated[second] = (("dechallenge", cues.dechallenge),
                                         ("rechallenge", cues.rechallenge))
    sentences += [_cue_sentence(rng, cue, value, patient, drug, reference) for cue, value in stated]
    if len(stated) <= 1 and rng.random() < DISTRACTOR_SHARE:
        # Right after the opening or at the end, so that "it" still follows the event sentence.
        sentences.insert(rng.choice((0, len(sentences))), _distractor(rng, patient))
    # The indication only where the snippet is short enough to spare its tokens.
    opening = _opening(rng, patient, drug, indication if len(stated) <= 2 else None, admission_day)
    return " ".join([opening] + sentences), drug, reference


# ----------------------------------------------------------------------------------------------
# Generation

def _check_arguments(n_examples: int, tag_shares: Mapping[str, float]) -> None:
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 20:
        raise ConfigError(f"config key data.demo.n_examples: {n_examples!r} is too small "
                          "(the demo task needs at least 20 rows)")
    if not isinstance(tag_shares, Mapping) or set(tag_shares) != set(TAGS):
        raise ConfigError(f"config key data.demo.tag_shares: {tag_shares!r} must give a share for each "
                          f"of the tags {', '.join(TAGS)}")
    shares = list(tag_shares.values())
    if (any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in shares)
            or abs(sum(shares) - 1.0) > 1e-6):
        raise ConfigError(f"config key data.demo.tag_shares: {dict(tag_shares)!r} must be shares of "
                          "at least 0 that sum to 1")


def _tag_counts(n_examples: int, tag_shares: Mapping[str, float]) -> dict[str, int]:
    """Rows per tag: each share of ``n_examples`` rounded, the rounding remainder given to the tags
    with the largest fractional parts (TAGS order breaks ties), so the counts sum to n_examples."""
    exact = {tag: n_examples * float(tag_shares[tag]) for tag in TAGS}
    counts = {tag: int(value) for tag, value in exact.items()}
    by_fraction = sorted(TAGS, key=lambda tag: (-(exact[tag] - counts[tag]), TAGS.index(tag)))
    for tag in by_fraction[: n_examples - sum(counts.values())]:
        counts[tag] += 1
    return counts


def _is_coherent(cues: Cues) -> bool:
    """A rechallenge needs an event that went away, so not after "persisted" or "continued"."""
    rechallenged = cues.rechallenge in ("recurred", "no_recurrence")
    return not (rechallenged and cues.dechallenge in ("persisted", "not_done"))


def _sample_case(rng: random.Random, tag: str, label: int) -> _Case:
    """Propose cue records of ``tag`` until one has ``label`` and the tag's conflict status."""
    want_conflict = tag == "conflicting"
    for _ in range(10_000):
        cues, onset_style = _PROPOSERS[tag](rng)
        if (label_case(cues) == label and cues_conflict(cues) == want_conflict
                and _is_coherent(cues)):
            snippet, drug, reference = _render(rng, cues, onset_style)
            return _Case(tag, cues, snippet, drug, reference)
    raise RuntimeError(f"demo generator: no {tag} case with label {LABELS[label]}")  # a bug here


def _generate_cases(n_examples: int, seed: int, tag_shares: Mapping[str, float]) -> list[_Case]:
    """The cases behind ``generate_demo``, with their cue records, in row order."""
    _check_arguments(n_examples, tag_shares)
    rng = random.Random(seed)
    plan: list[tuple[str, int]] = []
    for tag, count in _tag_counts(n_examples, tag_shares).items():
        # Labels balanced within each tag: cycle through the four, in shuffled order.
        labels = [index % len(LABELS) for index in range(count)]
        rng.shuffle(labels)
        plan += [(tag, label) for label in labels]
    rng.shuffle(plan)
    return [_sample_case(rng, tag, label) for tag, label in plan]


def _question(case: _Case) -> str:
    options = "\n".join(f"{letter}. {label}" for letter, label in zip(LETTERS, LABELS, strict=True))
    return (f"{case.snippet}\nHow likely is it that {case.drug} caused {case.event_reference}?\n"
            f"{options}\nAnswer with the letter only.")


def generate_demo(n_examples: int, seed: int, tag_shares: Mapping[str, float]) -> list[dict]:
    """Rows of the demo ADE-causality task: sample_id, tag, question, choices, answer, label.

    Deterministic: the same arguments give the same rows. ``tag_shares`` is each tag's share of
    the rows (tag ``conflicting``: the rows whose cues point both ways); labels follow RULE_DOC.
    """
    rows = []
    for index, case in enumerate(_generate_cases(n_examples, seed, tag_shares)):
        label = label_case(case.cues)
        rows.append({"sample_id": f"demo-{index:05d}", "tag": case.tag, "question": _question(case),
                     "choices": list(LETTERS), "answer": LETTERS[label], "label": label})
    return rows
