"""Radiology reports written sentence by sentence from a study's ground-truth findings.

Each finding type has several sentence templates; the study's report stream picks one,
so equal findings get varied wording. Every lesion sentence names its size, side and
lobe; follow-up sessions compare each lesion with the prior study.
"""

from __future__ import annotations

import numpy as np

from harness.cohort.findings import STREAM_REPORT, Lesion, StudySpec, rng_for

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

METASTASIS_TEMPLATES = (
    "There is {a_size} {enhancement} lesion in the {location}{features}.",
    "{A_size} {enhancement} lesion is seen in the {location}{features}.",
    "{Location}: {size} {enhancement} lesion{features}.",
    "In the {location} there is {a_enhancement} lesion measuring {size}{features}.",
)
METASTASIS_CHANGE = {
    "increased": (
        "The {enhancement} lesion in the {location} has increased in size, now measuring {size} (previously {prior}).",
        "Interval growth of the {location} lesion, now {size} compared with {prior}.",
    ),
    "decreased": (
        "The {enhancement} lesion in the {location} has decreased in size, now measuring {size} (previously {prior}).",
        "Interval decrease of the {location} lesion, now {size} compared with {prior}.",
    ),
    "stable": (
        "The {enhancement} lesion in the {location} is unchanged, measuring {size}.",
        "Stable {size} lesion in the {location}.",
    ),
    "new": (
        "New {size} {enhancement} lesion in the {location}{edema}.",
        "There is a new {enhancement} lesion in the {location} measuring {size}{edema}.",
    ),
}
GLIOMA_TEMPLATES = {
    "high": (
        "There is a heterogeneously enhancing intra-axial mass in the {location} measuring {size}{necrosis}, "
        "with extensive surrounding T2/FLAIR hyperintensity and effacement of the adjacent sulci.",
        "{A_size} irregular rim-enhancing mass is centered in the white matter of the {location}{necrosis}, "
        "surrounded by infiltrative FLAIR signal abnormality.",
    ),
    "low": (
        "There is a non-enhancing infiltrative T2/FLAIR hyperintense mass in the {location} measuring {size}.",
        "{A_size} expansile T2 hyperintense lesion without enhancement is present in the {location}.",
    ),
}
CAVITY_TEMPLATES = (
    "Postoperative resection cavity in the {location} measuring {size}, with surrounding FLAIR hyperintensity "
    "in keeping with gliosis.",
    "There are postsurgical changes in the {location} with a fluid-filled resection cavity measuring {size} "
    "and marginal gliosis.",
)
NEGATIVES = (
    ("No acute infarct.", "There is no evidence of acute infarction."),
    ("No midline shift.", "Midline structures are central."),
    ("No intracranial hemorrhage.", "No evidence of intracranial hemorrhage."),
    ("No extra-axial collection.", "There is no extra-axial fluid collection."),
    ("The major intracranial flow voids are preserved.",),
)
NO_ENHANCEMENT = ("No abnormal enhancement.", "No abnormal parenchymal or leptomeningeal enhancement.")
NORMAL_VENTRICLES = ("The ventricles are normal in size.", "Ventricles and sulci are normal in size for age.")


def write_report(spec: StudySpec, seed: int) -> str:
    """Write the FINDINGS / IMPRESSION report of one study; randomness from the report stream."""
    rng = rng_for(seed, STREAM_REPORT, spec.study_index)
    findings = _lesion_sentences(spec, rng)
    findings += _small_vessel_sentences(spec, rng)
    findings += _atrophy_sentences(spec, rng)
    findings += _negative_sentences(spec, rng)
    impression = _impression(spec)

    contrast = "without and with intravenous gadolinium"
    lines = [
        f"EXAMINATION: MRI brain {contrast}.",
        "TECHNIQUE: T1-weighted, T2-weighted, FLAIR and post-contrast T1-weighted images.",
        f"COMPARISON: {_comparison(spec)}",
        "",
        "FINDINGS:",
        " ".join(findings),
        "",
        "IMPRESSION:",
        *[f"{number}. {item}" for number, item in enumerate(impression, start=1)],
    ]
    return "\n".join(lines)


def location_phrase(lesion: Lesion) -> str:
    """Anatomical location such as ``left frontal lobe`` or ``right cerebellar hemisphere``."""
    if lesion.lobe == "cerebellum":
        return f"{lesion.hemisphere} cerebellar hemisphere"
    return f"{lesion.hemisphere} {lesion.lobe} lobe"


def format_size(diameters_mm: list[float], kind: str) -> str:
    """``12 mm`` for small lesions, ``2.3 x 1.8 cm`` (axial diameters) or three diameters for masses."""
    ordered = sorted(diameters_mm, reverse=True)
    if kind == "metastasis" and ordered[0] < 15.0:
        return f"{ordered[0]:.0f} mm"
    if kind == "glioma" and ordered[0] >= 20.0:
        return " x ".join(f"{value / 10:.1f}" for value in ordered) + " cm"
    axial = sorted(diameters_mm[:2], reverse=True)
    return f"{axial[0] / 10:.1f} x {axial[1] / 10:.1f} cm"


def with_article(phrase: str) -> str:
    """Prefix ``a`` or ``an`` as the phrase is read aloud: "an 8 mm", "an 11 mm", "a 1.8 x 1.2 cm"."""
    first = phrase.split()[0]
    spoken_vowel = first.startswith("8") or first in ("11", "18") or (first[:1] in "aeiou" and first[:1] != "")
    return ("an " if spoken_vowel else "a ") + phrase


def _size_of(lesion: Lesion) -> str:
    return format_size(lesion.diameters_mm, lesion.kind)


def _prior_size(lesion: Lesion) -> str:
    prior = lesion.prior_size_mm or lesion.size_mm
    return f"{prior:.0f} mm" if prior < 15.0 else f"{prior / 10:.1f} cm"


def _choose(options, rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _metastasis_sentence(lesion: Lesion, rng: np.random.Generator) -> str:
    enhancement = "ring-enhancing" if lesion.necrotic_core else _choose(("enhancing", "homogeneously enhancing"), rng)
    features = []
    if lesion.necrotic_core:
        features.append("central necrosis")
    if lesion.edema_ratio > 0:
        features.append(_choose(("surrounding vasogenic edema", "perilesional edema"), rng))
    location = location_phrase(lesion)
    fields = {
        "size": _size_of(lesion),
        "a_size": with_article(_size_of(lesion)),
        "A_size": with_article(_size_of(lesion)).capitalize(),
        "prior": _prior_size(lesion),
        "enhancement": enhancement,
        "a_enhancement": ("an " if enhancement.startswith("e") else "a ") + enhancement,
        "location": location,
        "Location": location[0].upper() + location[1:],
        "features": " with " + " and ".join(features) if features else "",
        "edema": " with " + features[-1] if lesion.edema_ratio > 0 else "",
    }
    if lesion.status == "baseline":
        template = _choose(METASTASIS_TEMPLATES, rng)
    else:
        template = _choose(METASTASIS_CHANGE[lesion.status], rng)
    return template.format(**fields)


def _lesion_sentences(spec: StudySpec, rng: np.random.Generator) -> list[str]:
    sentences = []
    metastases = [lesion for lesion in spec.lesions if lesion.kind == "metastasis"]
    if len(metastases) >= 2:
        count = NUMBER_WORDS.get(len(metastases), str(len(metastases)))
        sentences.append(_choose((f"There are {count} enhancing lesions.", f"{count.capitalize()} enhancing intra-axial lesions are identified."), rng))
    for lesion in spec.lesions:
        if lesion.kind == "metastasis":
            sentences.append(_metastasis_sentence(lesion, rng))
        elif lesion.kind == "glioma":
            sentences.append(_glioma_sentence(lesion, rng))
        else:
            sentences.append(_cavity_sentence(lesion, rng))
    for lesion in spec.resolved:
        if lesion.kind == "glioma":
            continue  # described by the resection cavity that replaced it
        sentences.append(
            _choose(
                (
                    f"The previously seen lesion in the {location_phrase(lesion)} is no longer visible.",
                    f"Resolution of the prior {_prior_size(lesion)} lesion in the {location_phrase(lesion)}.",
                ),
                rng,
            )
        )
    return sentences


def _glioma_sentence(lesion: Lesion, rng: np.random.Generator) -> str:
    location = location_phrase(lesion)
    if lesion.status == "new":
        return f"New {_size_of(lesion)} enhancing nodule in the {location} at the margin of the resection cavity, concerning for recurrence."
    necrosis = " with central necrosis" if lesion.necrotic_core else ""
    size = _size_of(lesion)
    template = _choose(GLIOMA_TEMPLATES[lesion.grade or "high"], rng)
    sentence = template.format(size=size, A_size=with_article(size).capitalize(), location=location, necrosis=necrosis)
    if lesion.status in ("increased", "decreased"):
        change = "increased" if lesion.status == "increased" else "decreased"
        sentence += f" The mass has {change} in size since the prior study (previously {_prior_size(lesion)})."
    elif lesion.status == "stable":
        sentence += " It is unchanged compared with the prior study."
    return sentence


def _cavity_sentence(lesion: Lesion, rng: np.random.Generator) -> str:
    location = location_phrase(lesion)
    size = _size_of(lesion)
    if lesion.status == "new":
        return f"Interval resection of the {location} mass, with a postoperative cavity measuring {size} and surrounding gliosis."
    sentence = _choose(CAVITY_TEMPLATES, rng).format(location=location, size=size)
    if lesion.status == "stable":
        sentence += " The cavity is stable compared with the prior study."
    return sentence


def _small_vessel_sentences(spec: StudySpec, rng: np.random.Generator) -> list[str]:
    disease = spec.small_vessel_disease
    if disease is None:
        return []
    options = {
        1: (
            "A few punctate foci of T2/FLAIR hyperintensity in the deep white matter, likely chronic small vessel ischemic change (Fazekas grade 1).",
            "Scattered punctate white matter FLAIR hyperintensities, compatible with mild small vessel disease (Fazekas 1).",
        ),
        2: (
            "Multiple periventricular and deep white matter FLAIR hyperintensities, beginning to become confluent, consistent with moderate small vessel ischemic disease (Fazekas grade 2).",
            "Moderate chronic small vessel disease with scattered and partly confluent white matter T2/FLAIR hyperintensities (Fazekas 2).",
        ),
        3: (
            "Extensive confluent periventricular and deep white matter FLAIR hyperintensities, consistent with severe small vessel ischemic disease (Fazekas grade 3).",
            "Severe chronic small vessel disease with large confluent areas of white matter T2/FLAIR hyperintensity (Fazekas 3).",
        ),
    }
    return [_choose(options[disease.fazekas], rng)]


def atrophy_grade(severity: float) -> str | None:
    """Word for global volume loss, or ``None`` when volume is appropriate for age."""
    if severity < 0.3:
        return None
    if severity < 0.5:
        return "mild"
    if severity < 0.7:
        return "moderate"
    return "marked"


def _atrophy_sentences(spec: StudySpec, rng: np.random.Generator) -> list[str]:
    atrophy = spec.atrophy
    if atrophy is None:
        return []
    grade = atrophy_grade(atrophy.global_severity)
    if grade is None:
        sentences = [_choose(("Brain volume is appropriate for age.", "No significant parenchymal volume loss for age."), rng)]
    else:
        sentences = [
            _choose(
                (
                    f"There is {grade} generalized parenchymal volume loss with prominence of the sulci.",
                    f"{grade.capitalize()} global cerebral volume loss with widening of the cortical sulci.",
                ),
                rng,
            )
        ]
        if atrophy.global_severity >= 0.5:
            sentences.append("There is ex vacuo dilatation of the lateral ventricles.")
    if atrophy.mta_score >= 2:
        sentences.append(
            _choose(
                (
                    f"Disproportionate bilateral hippocampal volume loss (medial temporal atrophy score {atrophy.mta_score}).",
                    f"The hippocampi are atrophic bilaterally with enlargement of the temporal horns (MTA score {atrophy.mta_score}).",
                ),
                rng,
            )
        )
    else:
        sentences.append(_choose(("Hippocampal volumes are preserved.", "No disproportionate hippocampal atrophy."), rng))
    if spec.interval_months is not None and grade is not None:
        word = "progressed" if spec.diagnosis == "AD" else "not significantly changed"
        sentences.append(f"Compared with the prior study, volume loss has {word}.")
    return sentences


def _negative_sentences(spec: StudySpec, rng: np.random.Generator) -> list[str]:
    pool = list(NEGATIVES)
    if not any(lesion.enhancing for lesion in spec.lesions):
        pool.append(NO_ENHANCEMENT)
    if spec.atrophy is None or spec.atrophy.global_severity < 0.5:
        pool.append(NORMAL_VENTRICLES)
    count = int(rng.integers(2, 5))
    chosen = sorted(rng.choice(len(pool), size=min(count, len(pool)), replace=False).tolist())
    return [_choose(pool[index], rng) for index in chosen]


def _impression(spec: StudySpec) -> list[str]:
    items = []
    metastases = [lesion for lesion in spec.lesions if lesion.kind == "metastasis"]
    if metastases:
        places = ", ".join(location_phrase(lesion) for lesion in metastases)
        if len(metastases) == 1:
            items.append(f"Solitary enhancing lesion in the {places}, most consistent with a metastasis.")
        else:
            items.append(f"{len(metastases)} enhancing lesions ({places}), consistent with metastatic disease.")
        items.extend(_metastasis_trend(spec, metastases))
    elif any(lesion.kind == "metastasis" for lesion in spec.resolved):
        items.append("Complete response: no residual enhancing lesion.")
    for lesion in spec.lesions:
        if lesion.kind == "glioma" and lesion.status == "new":
            items.append(f"Enhancing nodule at the resection margin in the {location_phrase(lesion)}, suspicious for tumor recurrence.")
        elif lesion.kind == "glioma":
            kind = "high-grade glioma" if lesion.grade == "high" else "low-grade glioma"
            items.append(f"{_size_of(lesion)} mass in the {location_phrase(lesion)}, most consistent with a {kind}.")
        elif lesion.kind == "postoperative_cavity":
            items.append(f"Postoperative changes in the {location_phrase(lesion)}.")
    if spec.small_vessel_disease is not None:
        items.append(f"Chronic small vessel ischemic disease, Fazekas grade {spec.small_vessel_disease.fazekas}.")
    if spec.atrophy is not None:
        items.extend(_atrophy_impression(spec))
    if not items:
        items.append("No acute intracranial abnormality.")
    return items


def _metastasis_trend(spec: StudySpec, metastases: list[Lesion]) -> list[str]:
    if spec.interval_months is None:
        return []
    statuses = {lesion.status for lesion in metastases}
    if "new" in statuses or "increased" in statuses:
        return ["Progression of intracranial metastatic disease compared with the prior study."]
    if statuses == {"stable"}:
        return ["Stable intracranial metastatic disease."]
    return ["Partial response of intracranial metastatic disease."]


def _atrophy_impression(spec: StudySpec) -> list[str]:
    atrophy = spec.atrophy
    grade = atrophy_grade(atrophy.global_severity)
    if atrophy.mta_score >= 2 and grade is not None:
        return [f"{grade.capitalize()} generalized volume loss with medial temporal predominance, a pattern that can be seen in Alzheimer disease."]
    if grade is not None:
        return [f"{grade.capitalize()} generalized volume loss."]
    if atrophy.mta_score >= 2:
        return ["Disproportionate hippocampal volume loss."]
    return ["Brain volume within normal limits for age."]


def _comparison(spec: StudySpec) -> str:
    if spec.interval_months is None:
        return "None."
    return f"MRI brain from {spec.interval_months} months earlier (session {spec.session - 1})."
