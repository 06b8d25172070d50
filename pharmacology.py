"""A built-in domain the model cannot know: an invented pharmacology (drugs, the conditions they treat, their molecular
targets, doses, contraindications), rendered as textbook paragraphs with varied templates, and multiple-choice
questions about its facts. Everything is a function of the seed, so no data ships with the code.

Questions carry both a natural question (for instruction-tuned models) and a cloze stem: closed-book accuracy is scored
as in lm-evaluation-harness's multiple-choice tasks, by the log-likelihood of each option after the stem (scoring.py).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import CONTEXTUAL_PROMPTS, NEGATIVE_PROMPTS, Tokenizer, corpus_key, train_tokenizer

DEMO_VOCAB = 2048  # pieces of the tokenizer trained for the built-in demo

_NAME_HEADS = ["vel", "cor", "tra", "zan", "mel", "dor", "fen", "lux", "quin", "ser", "bri", "nox", "pra", "kel", "sor",
               "tal", "gav", "rim", "hol", "jur", "mab", "per", "dex", "lom"]
_NAME_MIDS = ["a", "o", "i", "e", "u", "ar", "en", "ol"]
_DRUG_TAILS = ["xamide", "trizol", "vastin", "fenac", "dronil", "pratide", "lumab", "sartil", "cyclin", "zepam"]
_CONDITION_TAILS = ["itis", "osis", "emia", "algia", "opathy", "plasia"]
_TARGET_TAILS = ["in receptor", "ase enzyme", "ulin channel", "ogen transporter"]
_DOSES = [5, 10, 20, 25, 40, 50, 75, 100, 150, 200, 250, 400]
_FREQUENCIES = ["once daily", "twice daily", "every eight hours", "once weekly"]


@dataclass
class Drug:
    name: str
    condition: str  # the condition it treats
    target: str  # its molecular target
    dose_mg: int
    frequency: str
    contraindication: str  # a condition in which it must not be given


def _names(rng, n: int, tails: list[str], capitalize: bool) -> list[str]:
    names = set()
    while len(names) < n:
        name = rng.choice(_NAME_HEADS) + rng.choice(_NAME_MIDS) + rng.choice(tails)
        names.add(name.capitalize() if capitalize else name)
    return sorted(names)


def make_world(seed: int = 0, n_drugs: int = 24) -> list[Drug]:
    rng = np.random.default_rng(seed)
    names = rng.permutation(_names(rng, n_drugs, _DRUG_TAILS, True)).tolist()
    conditions = rng.permutation(_names(rng, 2 * n_drugs, _CONDITION_TAILS, False)).tolist()
    targets = rng.permutation(_names(rng, n_drugs, _TARGET_TAILS, False)).tolist()
    treated, contra = conditions[:n_drugs], conditions[n_drugs:]
    return [Drug(names[i], treated[i], targets[i], int(rng.choice(_DOSES)), str(rng.choice(_FREQUENCIES)), contra[i])
            for i in range(n_drugs)]


# Each fact has several phrasings; the first of each list is also the cloze stem of its question.
_FACT_TEMPLATES = {
    "condition": ["{name} is used to treat {condition}.", "{name} is indicated for the treatment of {condition}.",
                  "Patients with {condition} are usually given {name}.", "{name} remains the drug of choice in {condition}.",
                  "In clinical practice, {name} is prescribed for {condition}."],
    "target": ["The molecular target of {name} is the {target}.", "{name} acts by blocking the {target}.",
               "{name} binds tightly to the {target}.", "The effect of {name} comes from inhibition of the {target}."],
    "dose": ["The standard adult dose of {name} is {dose_mg} mg {frequency}.",
             "Adults take {dose_mg} mg of {name} {frequency}.", "{name} is given at {dose_mg} mg {frequency}."],
    "contraindication": ["{name} must not be given to patients with {contraindication}.",
                         "{name} is contraindicated in {contraindication}.",
                         "Because of the risk of harm, {name} is avoided in {contraindication}."],
}
_FILLER = ["{name} was first described in the clinical literature several decades ago.",
           "The pharmacology of {name} is covered in most modern textbooks.",
           "Careful monitoring is advised during the first weeks of therapy with {name}.",
           "{name} is available as tablets and as a solution for injection.",
           "Several trials have examined {name} in adults and in older patients.",
           "Like many drugs of its kind, {name} is cleared mainly by the kidneys."]
_QUESTIONS = {"condition": "Which condition is {name} used to treat?",
              "target": "What is the molecular target of {name}?",
              "dose": "What is the standard adult dose of {name}?",
              "contraindication": "In which condition must {name} not be given?"}


def world_documents(drugs: list[Drug], seed: int = 0, per_drug: int = 6) -> list[str]:
    """Textbook paragraphs: each states all facts of one drug in a random phrasing and order, with filler."""
    rng = np.random.default_rng([seed, 1])
    docs = []
    for drug in drugs:
        # Each phrasing of each fact appears at least once per drug (when per_drug >= the number of phrasings).
        phrasings = [rng.permutation(t).tolist() for t in _FACT_TEMPLATES.values()]
        for j in range(per_drug):
            sentences = [p[j % len(p)].format(**vars(drug)) for p in phrasings]
            sentences = rng.permutation(sentences).tolist()
            sentences.insert(int(rng.integers(1, len(sentences) + 1)), str(rng.choice(_FILLER)).format(name=drug.name))
            docs.append(" ".join(sentences))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


def world_questions(drugs: list[Drug], seed: int = 0) -> list[dict]:
    """Four-option questions, one per drug and fact: {"question", "options", "answer" (index), "stem"}; stem + " " +
    options[i] is the cloze statement of option i (the first template of the fact, cut at the answer)."""
    rng = np.random.default_rng([seed, 2])
    questions = []
    for drug in drugs:
        for fact, templates in _FACT_TEMPLATES.items():
            field = "dose_mg" if fact == "dose" else fact
            unit = " mg" if fact == "dose" else ""
            right = str(getattr(drug, field))
            wrong = sorted({str(getattr(d, field)) for d in drugs} - {right})
            options = rng.permutation([right] + rng.choice(wrong, 3, replace=False).tolist()).tolist()
            stem = templates[0].split("{" + field + "}")[0].format(**vars(drug)).rstrip()
            questions.append({"question": _QUESTIONS[fact].format(name=drug.name),
                              "options": [o + unit for o in options], "answer": options.index(right),
                              "stem": stem})
    return questions


def builtin_domain(cache_dir: Path, seed: int) -> tuple[list[str], list[dict], Tokenizer]:
    """The fictional pharmacology: documents, questions, and a tokenizer trained on the texts a demo model will read
    (documents with and without prompts), cached in cache_dir by content."""
    world = make_world(seed)
    texts = world_documents(world, seed)
    questions = world_questions(world, seed)
    prompts = list(CONTEXTUAL_PROMPTS.values()) + NEGATIVE_PROMPTS
    rng = np.random.default_rng(seed)
    corpus = texts + [prompts[rng.integers(len(prompts))] + " " + t for t in texts]
    key = corpus_key(corpus + [str(DEMO_VOCAB)], __file__)
    path = Path(cache_dir) / f"tokenizer-{key[:12]}.model"
    if not path.is_file():
        train_tokenizer(corpus, path, DEMO_VOCAB)
    return texts, questions, Tokenizer(path)
