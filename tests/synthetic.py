"""Synthetic multiple-choice traces the tests write themselves, so that the product tests need
nothing beside the repository (the recorded research traces may not be redistributed).

Not a test module: a generator. The rows follow the DESIGN.md trace format and look like the
recorded MMLU traces (a letter answer, a logprob confidence, a cost from token counts and a
price), from a known model of the world, so a test can rely on what a fit must find:

- each row has a subject; subjects differ in difficulty, and the subject is a word of the
  prompt (so the prompt-difficulty model has something to learn);
- a model's confidence is log p, where p = sigmoid(skill - difficulty + noise);
- the model is right with probability exactly p: P(correct | confidence) = exp(confidence),
  a calibrated and monotone relation;
- a wrong answer is often the row's shared distractor, so wrong models can agree;
- now and then a model answers with no letter at all (`Unsure`, one token, never correct), as
  recorded models do; then a cheaper model's letter can beat the priciest model's answer.

Everything is drawn from one seeded generator: the same arguments write the same bytes.

With `samples=S`, every model also carries S further sampled answers (DESIGN.md `samples`),
drawn from a second seeded generator (so the rows are otherwise the same bytes) with a planted
agreement structure: `independent` samples are right with the row's own p, independently
given p (the self-consistency world: the vote share carries information beyond one answer,
and the majority of five is right more often than one answer); `copies` repeat the recorded
answer (a vote that tells nothing, so a sampled node only costs more).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SyntheticModel:
    """One model of the ladder: how good it is and what it costs."""

    name: str
    skill: float  # log-odds of a right answer on a query of difficulty 0
    price_in: float  # USD per million prompt tokens
    price_out: float  # USD per million answer tokens
    latency_ms: float  # median latency of one call


# cheapest first. `medium` is poor value (barely better than `small`, twice its price), so an
# unconstrained policy skips it; `small` -> `large` is the pair the serving tests use.
LADDER = (
    SyntheticModel("tiny", -0.9, 0.05, 0.05, 120.0),
    SyntheticModel("small", -0.3, 0.1, 0.1, 150.0),
    SyntheticModel("medium", -0.1, 0.2, 0.4, 200.0),
    SyntheticModel("big", 1.4, 0.9, 0.9, 350.0),
    SyntheticModel("large", 2.2, 3.0, 3.0, 450.0),
)
MODELS = {m.name: m for m in LADDER}
PRICES = {m.name: (m.price_in, m.price_out) for m in LADDER}  # USD per million tokens in, out
TASK = "synthetic-mc"
NO_ANSWER = "Unsure"  # no letter to extract: graded wrong
NO_ANSWER_RATE = 0.04
LETTERS = "ABCD"
SUBJECTS = {"arithmetic": -1.2, "geography": -0.4, "chemistry": 0.4, "topology": 1.2}
SYSTEM = 'Answer the multiple-choice question by outputting "A", "B", "C" or "D", nothing else.'
WORDS = (  # noqa: SIM905 (a list literal would take 37 lines)
    "river stone market engine garden signal harbor valley ledger orbit lantern meadow copper "
    "bridge falcon quarry cipher glacier thimble meridian saddle furnace prism vessel beacon "
    "compass orchard tundra anvil pendulum granite marble lattice spindle ember delta mosaic"
).split()


SAMPLE_MODES = ("independent", "copies")


def _sample(rng: np.random.Generator, p: float, reference: str, distractor: str) -> str:
    """One sampled answer, right with probability p; wrong ones favour the distractor."""
    wrong = [c for c in LETTERS if c != reference]
    if rng.random() < NO_ANSWER_RATE:
        return NO_ANSWER
    if rng.random() < p:
        return reference
    return distractor if rng.random() < 0.6 else wrong[int(rng.integers(3))]


def _rows(
    models: tuple[SyntheticModel, ...],
    n_rows: int,
    seed: int,
    prefix: str,
    samples: int = 0,
    mode: str = "independent",
) -> list[dict]:
    if mode not in SAMPLE_MODES:
        raise ValueError(f"unknown sample mode {mode!r}; expected one of {SAMPLE_MODES}")
    rng = np.random.default_rng(seed)
    sample_rng = np.random.default_rng([seed, 17])
    subjects = list(SUBJECTS)
    rows = []
    for i in range(n_rows):
        subject = subjects[int(rng.integers(len(subjects)))]
        difficulty = SUBJECTS[subject] + rng.normal(0.0, 0.9)
        reference = LETTERS[int(rng.integers(4))]
        wrong = [c for c in LETTERS if c != reference]
        distractor = wrong[int(rng.integers(3))]
        stem = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 20))))
        options = "\n".join(f"{c}: {' '.join(rng.choice(WORDS, size=3))}" for c in LETTERS)
        question = (
            f"Question {i} ({subject}): which option completes '{stem}'?\n\n"
            f"Choices:\n{options}\n\nAnswer: "
        )
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        tokens_in = sum(len(m["content"].split()) for m in messages)
        entries = {}
        for m in models:
            p = 1.0 / (1.0 + math.exp(-(m.skill - difficulty + rng.normal(0.0, 0.7))))
            p = min(max(p, 1e-4), 1.0 - 1e-6)
            correct = bool(rng.random() < p)
            if rng.random() < NO_ANSWER_RATE:
                answer, correct = NO_ANSWER, False
            elif correct:
                answer = reference
            elif rng.random() < 0.6:
                answer = distractor
            else:
                answer = wrong[int(rng.integers(3))]
            entries[m.name] = {
                "answer": answer,
                "correct": correct,
                "confidence": round(math.log(p), 6),
                "cost_usd": (tokens_in * m.price_in + m.price_out) / 1e6,
                "latency_ms": round(m.latency_ms * float(rng.lognormal(0.0, 0.25)), 3),
                "tokens_in": tokens_in,
                "tokens_out": 1,
            }
            if samples:
                entries[m.name]["samples"] = [
                    answer if mode == "copies" else _sample(sample_rng, p, reference, distractor)
                    for _ in range(samples)
                ]
        rows.append(
            {
                "id": f"{prefix}-{i}",
                "task": TASK,
                "reference": reference,
                "messages": messages,
                "models": entries,
            }
        )
    return rows


def write_choice_traces(
    path: Path,
    models: list[str] | None = None,
    n_rows: int = 300,
    seed: int = 0,
    prefix: str = "syn",
    samples: int = 0,
    mode: str = "independent",
) -> Path:
    """Write `n_rows` synthetic rows answered by `models` (names of LADDER, default all) to
    `path` and return it. Ids are `prefix`-0, `prefix`-1, ...: give the train and the test
    file of a pair different prefixes and seeds. `samples` further answers per model, with
    the agreement structure `mode` (see the module docstring)."""
    chosen = tuple(MODELS[name] for name in models) if models else LADDER
    chosen = tuple(sorted(chosen, key=lambda m: LADDER.index(m)))  # cheapest first
    rows = _rows(chosen, n_rows, seed, prefix, samples, mode)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_choice_pair(
    folder: Path, name: str = "synthetic", n_train: int = 300, n_test: int = 300
) -> tuple[Path, Path]:
    """`folder`/NAME-train.jsonl and NAME-test.jsonl over the whole LADDER: independent draws
    from the same world (other seeds, other ids), as a recorded train/test pair."""
    train = write_choice_traces(folder / f"{name}-train.jsonl", n_rows=n_train, seed=1, prefix="tr")
    test = write_choice_traces(folder / f"{name}-test.jsonl", n_rows=n_test, seed=2, prefix="te")
    return train, test


def write_planted_samples(
    source: Path,
    path: Path,
    samples: int = 4,
    seed: int = 0,
    mode: str = "independent",
    p_right: float = 0.8,
    p_wrong: float = 0.3,
) -> Path:
    """Recorded traces with `samples` planted per model: `independent` samples are right
    with probability `p_right` when the recorded answer is right and `p_wrong` when it is
    not, independently given that (a known agreement structure tied to the recorded
    correctness). A numeric reference (GSM8K): a wrong sample is the reference plus one (a
    shared wrong answer) half the time, else plus 2-20; a letter A-D (multiple choice): the
    next letter half the time, else another. `copies` repeat the recorded answer. Every
    other field is the recorded row's."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"unknown sample mode {mode!r}; expected one of {SAMPLE_MODES}")
    rng = np.random.default_rng([seed, 17])
    out = []
    for line in source.read_text(encoding="utf-8").split("\n"):  # not splitlines: U+2028
        if not line.strip():
            continue
        row = json.loads(line)
        letter = str(row["reference"]).strip().upper()
        choice = len(letter) == 1 and letter in LETTERS
        reference = 0.0 if choice else float(row["reference"])
        for entry in row["models"].values():
            if mode == "copies":
                entry["samples"] = [entry["answer"]] * samples
                continue
            p = p_right if entry["correct"] else p_wrong
            drawn = []
            for _ in range(samples):
                if choice:
                    right, shared = rng.random() < p, rng.random() < 0.5
                    step = 1 if shared else int(rng.integers(2, 4))
                    drawn.append(letter if right else LETTERS[(LETTERS.index(letter) + step) % 4])
                elif rng.random() < p:
                    drawn.append(f"So the answer is #### {reference:g}")
                else:
                    value = reference + (1 if rng.random() < 0.5 else int(rng.integers(2, 21)))
                    drawn.append(f"So the answer is #### {value:g}")
            entry["samples"] = drawn
        out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
