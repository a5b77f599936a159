"""`cascade bench`: the evaluation protocol of DESIGN.md on every train/test pair of a folder.

Per pair: every policy family is fitted and its knob swept on train only; each train-selected
setting is replayed on test; a policy's curve is the Pareto envelope of its test points
(accuracy against mean cost as a fraction of the reference model's mean test cost).
Outputs: bench.json (machine-readable), bench.md (tables), NAME.png (one plot per pair).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.baselines import baseline_families
from calibration.fit import IndexFamily, select_nodes
from calibration.metrics import CurvePoint, curve_stats, oracle_savings
from calibration.prerouter import PrerouterFamily
from calibration.pricing import PricingError, fill_costs
from calibration.replay import PolicyFamily
from calibration.sampling import SampleSpec, add_sampled
from calibration.textfit import is_open_ended
from calibration.traces import TraceError, TraceSet, load_traces
from policies.errors import InvalidInput

# Order of columns in bench.md and of lines in the plots; oracles last.
MAIN_POLICIES = (
    "index",
    "index-norecall",
    "index-length",
    "threshold",
    "agreement",
    "prerouter",
    "singles",
)
ORACLES = ("oracle-routing", "oracle-cascade")


@dataclass
class Pair:
    name: str
    train: Path
    test: Path


@dataclass
class PairResult:
    name: str
    result: dict  # the bench.json entry of this pair
    cost_source: str
    seconds: float
    fit_seconds: dict[str, float] = field(default_factory=dict)


def find_pairs(folder: Path) -> tuple[list[Pair], list[str]]:
    """Every NAME-train.jsonl with its NAME-test.jsonl, and a message per incomplete pair."""
    if not folder.is_dir():
        raise FileNotFoundError(f"trace folder not found: {folder}")
    trains = {p.name[: -len("-train.jsonl")]: p for p in folder.glob("*-train.jsonl")}
    tests = {p.name[: -len("-test.jsonl")]: p for p in folder.glob("*-test.jsonl")}
    pairs = [Pair(n, trains[n], tests[n]) for n in sorted(trains.keys() & tests.keys())]
    skipped = [f"skipped {n}: {trains[n].name} has no matching -test.jsonl" for n in trains]
    skipped = [s for s, n in zip(skipped, trains, strict=True) if n not in tests]
    skipped += [
        f"skipped {n}: {tests[n].name} has no matching -train.jsonl"
        for n in sorted(tests.keys() - trains.keys())
    ]
    return pairs, sorted(skipped)


class PairError(InvalidInput):
    """A pair that cannot be benchmarked: a bad trace file, a model without a price, or
    halves with different models. The bench skips it with this message."""


def load_pair(pair: Pair, samples: list[SampleSpec] | None = None) -> tuple[TraceSet, TraceSet]:
    """Both halves of a pair, with costs filled from token counts and prices where missing
    (and the sampled columns `samples` asks for, built alike on each half)."""
    try:
        train, test = load_traces(pair.train), load_traces(pair.test)
        if train.models != test.models and set(train.models) == set(test.models):
            test = test.select_models(list(train.models))  # same models, listed in another order
        if train.models != test.models:
            raise PairError(
                f"{pair.name}: train and test have different models: "
                f"{list(train.models)} vs {list(test.models)}"
            )
        train, test = fill_costs(train), fill_costs(test)
        if samples:
            train, test = add_sampled(train, samples), add_sampled(test, samples)
        return train, test
    except (TraceError, PricingError) as exc:
        raise PairError(str(exc)) from None


def families_for(train: TraceSet) -> list[PolicyFamily]:
    """The index policy, its ablations and the baselines; on open-ended traces also
    `index-length`, whose calibrators read the answers' length alone (how much of the
    gain is the judge's taste for length)."""
    families: list[PolicyFamily] = [IndexFamily(recall=True), IndexFamily(recall=False)]
    if is_open_ended(train, list(range(train.n_models))):
        families.append(IndexFamily(text_groups=("length",), name="index-length"))
    return [*families, PrerouterFamily(), *baseline_families(train)]


def _curves(
    train: TraceSet, test: TraceSet, on_policy: Callable[[str], None] | None
) -> tuple[dict, dict[str, float]]:
    """Every family fitted on `train` and replayed on `test`, both scored on their label:
    the curve entry of bench.json (best single, policies, oracle savings) and fit times."""
    mean_cost = np.nanmean(test.cost_usd, axis=0)
    ref_cost = float(mean_cost[test.reference])
    accuracy = test.correct.mean(axis=0)
    best = int(np.argmax(accuracy))
    best_acc = float(accuracy[best])
    policies: dict[str, dict] = {}
    fit_seconds: dict[str, float] = {}
    roots: dict[str, dict] = {}  # the index policies' root kind, chosen on train
    for family in families_for(train):
        t0 = time.perf_counter()
        settings = family.fit_sweep(train)
        fit_seconds[family.name] = time.perf_counter() - t0
        if isinstance(family, IndexFamily) and settings:
            roots[family.name] = settings[0].fitted.root_choice
        points = []
        for setting in settings:
            outcome = setting.replay(test)
            points.append(CurvePoint(setting.knob, outcome.accuracy, outcome.mean_cost / ref_cost))
        policies[family.name] = curve_stats(points, best_acc)
        if on_policy:
            on_policy(family.name)
    curve = {
        "best_single": {"model": test.models[best], "accuracy": best_acc},
        "policies": policies,
        "oracle_savings": oracle_savings(
            policies["index"],
            policies["oracle-routing"],
            None if train.label == "correct" else best_acc,  # graded: a swept oracle
        ),
        "root_choice": roots,
    }
    return curve, fit_seconds


def run_pair(
    pair: Pair,
    on_policy: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    samples: list[SampleSpec] | None = None,
) -> PairResult:
    """Fit every family on train, replay every setting on test, summarise the curves.
    A pair whose traces all carry `quality` gets a second curve, mean quality against cost
    (`quality`), from families fitted again on the graded labels (`fit --label quality`).
    `on_start(n)` is told how many policies there are, `on_policy(name)` each one done;
    `samples` offers sampled nodes (model@k) as `--samples` does."""
    start = time.perf_counter()
    train, test = load_pair(pair, samples)
    graded = train.has_quality and test.has_quality
    if on_start:
        on_start(len(families_for(train)) * (2 if graded else 1))
    ref = test.reference
    curve, fit_seconds = _curves(train, test, on_policy)
    result = {
        "reference_model": test.models[ref],
        "reference_cost_usd": float(np.nanmean(test.cost_usd, axis=0)[ref]),
        "best_single": curve["best_single"],
        "train_rows": len(train),
        "test_rows": len(test),
        "models": list(test.models),
        "nodes": [train.models[j] for j in select_nodes(train)],  # kept by node selection
        "policies": curve["policies"],
        "oracle_savings": curve["oracle_savings"],
        "root_choice": curve["root_choice"],
    }
    if graded:
        quality, seconds = _curves(
            train.with_label("quality"), test.with_label("quality"), on_policy
        )
        result["quality"] = quality
        fit_seconds.update({f"{k} (quality)": v for k, v in seconds.items()})
    return PairResult(pair.name, result, test.cost_source, time.perf_counter() - start, fit_seconds)


BASELINES = ("threshold", "agreement", "prerouter", "singles")


def curve_of(result: PairResult, curve: str) -> dict | None:
    """One curve's entry of a pair (`best_single`, `policies`, `oracle_savings`): `correct`
    (the pair's own fields) or `quality` (None for a pair without graded labels)."""
    return result.result if curve == "correct" else result.result.get(curve)


def verdict(result: PairResult) -> str:
    """One plain line on a finished pair: the index policy's AUC against the best
    baseline's, and its cost to come within a point of the best single model (per curve)."""
    parts = []
    for curve in CURVES:
        entry = curve_of(result, curve)
        if entry is None:
            continue
        policies = entry["policies"]
        index = policies["index"]
        best = max((n for n in BASELINES if n in policies), key=lambda n: policies[n]["auc"])
        within = index["cost_to_match_1pp"]
        parts.append(
            f"{'quality: ' if curve == 'quality' else ''}index AUC {index['auc']:.4f}, "
            f"best baseline {best} {policies[best]['auc']:.4f}, cost within 1 pt {_fmt(within)}"
        )
    return f"{result.name}: {'; '.join(parts)} ({result.seconds:.1f} s)"


CURVES = ("correct", "quality")  # accuracy against cost; mean quality against cost


def summary(results: list[PairResult], curve: str = "correct") -> dict:
    """Means over pairs: auc and cost_to_match_1pp (never counts as 1.0, stated in bench.md),
    each over the pairs of `curve` that ran the policy (index-length: open-ended pairs only)."""
    entries = [e for r in results if (e := curve_of(r, curve)) is not None]
    names = list(dict.fromkeys(n for e in entries for n in e["policies"]))
    out = {}
    for name in names:
        stats = [e["policies"][name] for e in entries if name in e["policies"]]
        c1 = [s["cost_to_match_1pp"] for s in stats]
        out[name] = {
            "auc": float(np.mean([s["auc"] for s in stats])),
            "cost_to_match_1pp": float(np.mean([1.0 if c is None else c for c in c1])),
            "never_1pp": sum(c is None for c in c1),
            "acc_at_20": float(np.mean([s["acc_at_20"] for s in stats])),
            "acc_at_50": float(np.mean([s["acc_at_50"] for s in stats])),
        }
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "never" if x is None else f"{x:.{digits}f}"


def _columns(results: list[PairResult]) -> list[str]:
    seen = [n for r in results for n in r.result["policies"]]
    main = [n for n in MAIN_POLICIES if n in seen]
    return main + [n for n in ORACLES if n in seen]


def write_markdown(results: list[PairResult], skipped: list[str], how: str) -> str:
    cols = _columns(results)
    lines = ["# cascade bench", "", how, ""]
    if skipped:
        lines += ["Skipped pairs: " + "; ".join(s.removeprefix("skipped ") for s in skipped), ""]

    def table(title: str, key: str, digits: int, note: str = "", curve: str = "correct") -> None:
        mean = summary(results, curve)
        lines.extend([f"## {title}", ""])
        if note:
            lines.extend([note, ""])
        lines.append("| pair | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for r in results:
            entry = curve_of(r, curve)
            if entry is None:
                continue
            cells = []
            ran = entry["policies"]
            row_vals = {c: ran[c][key] if c in ran else None for c in cols}
            finite = [v for c, v in row_vals.items() if v is not None and c not in ORACLES]
            best = (min(finite) if key.startswith("cost") else max(finite)) if finite else None
            for c in cols:
                v = row_vals[c]
                cell = _fmt(v, digits) if c in ran else "–"
                top = c not in ORACLES and v is not None and best is not None
                if top and round(v, digits) == round(best, digits):
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
        if key in ("auc", "cost_to_match_1pp", "acc_at_20", "acc_at_50"):
            means = [_fmt(mean[c][key], digits) for c in cols]
            lines.append("| **mean** | " + " | ".join(means) + " |")
        lines.append("")

    table("Area under the accuracy-cost curve, cost in [0, 1] (higher is better)", "auc", 4)
    table(
        "Cost to come within 1 point of the best single model (fraction of reference cost)",
        "cost_to_match_1pp",
        3,
        "Lower is better; the mean counts `never` as 1.0.",
    )
    table("Cost to match the best single model's accuracy", "cost_to_match", 3)
    table("Accuracy at cost 0.2", "acc_at_20", 3)
    table("Accuracy at cost 0.5", "acc_at_50", 3)
    graded = [r for r in results if curve_of(r, "quality") is not None]
    if graded:
        lines += [
            "## Mean quality against cost (pairs with graded labels)",
            "",
            "Pairs whose answers all carry `quality` (a judge's graded score in [0, 1]) get a "
            "second curve: every policy fitted again on the graded labels (`fit --label "
            "quality`: loss 1 - E[quality]) and scored by the mean quality of the answers it "
            "returns; `best single` is the single model of highest mean test quality. Means "
            "are over these pairs: " + ", ".join(r.name for r in graded) + ".",
            "",
        ]
        q = "quality"
        table("Quality: area under the mean-quality-cost curve", "auc", 4, curve=q)
        table(
            "Quality: cost to come within 1 point of the best single model's mean quality",
            "cost_to_match_1pp",
            3,
            "Lower is better; the mean counts `never` as 1.0.",
            curve=q,
        )
        table(
            "Quality: cost to match the best single model's mean quality",
            "cost_to_match",
            3,
            curve=q,
        )
        table("Quality: mean quality at cost 0.2", "acc_at_20", 3, curve=q)
        table("Quality: mean quality at cost 0.5", "acc_at_50", 3, curve=q)

    lines += [
        "## Index policy against the routing oracle",
        "",
        "`oracle_savings`: the share of the routing oracle's savings (1 - its cost) that the index "
        "policy captures at the best single model's accuracy (`at_match`) and one point below it "
        "(`at_1pp`); `never` when the index policy does not reach that accuracy.",
        "",
        "| pair | best single (test acc) | reference model | index cost @1pp | oracle cost "
        "(acc) | oracle_savings at_match | at_1pp |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        res = r.result
        orc = res["policies"]["oracle-routing"]
        orc_point = orc["curve"][-1] if orc["curve"] else {"cost": None, "accuracy": None}
        lines.append(
            f"| {r.name} | {res['best_single']['model']} ({res['best_single']['accuracy']:.3f}) "
            f"| {res['reference_model']} | {_fmt(res['policies']['index']['cost_to_match_1pp'])} "
            f"| {_fmt(orc_point['cost'])} ({_fmt(orc_point['accuracy'])}) "
            f"| {_fmt(res['oracle_savings']['at_match'])} "
            f"| {_fmt(res['oracle_savings']['at_1pp'])} |"
        )
    lines += ["", "## Where costs came from", ""]
    for r in results:
        lines.append(f"- {r.name}: {r.cost_source}")
    lines += ["", "## Run time (seconds; fit = the whole knob sweep on train)", ""]
    for r in results:
        fits = ", ".join(f"{k} {v:.1f}" for k, v in r.fit_seconds.items())
        lines.append(f"- {r.name}: {r.seconds:.1f} in all; fit: {fits}")
    return "\n".join(lines) + "\n"


def plot_pair(res: PairResult, path: Path, curve: str = "correct") -> None:
    """Accuracy (or mean quality) against cost: every policy's envelope, single models as
    points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=110)
    styles = {
        "index": ("tab:red", "-", 2.4),
        "index-norecall": ("tab:orange", "--", 1.6),
        "threshold": ("tab:blue", "-", 1.4),
        "agreement": ("tab:green", "-", 1.4),
        "singles": ("black", ":", 1.6),
        "index-length": ("tab:pink", "--", 1.2),
        "prerouter": ("tab:brown", "-", 1.2),
        "oracle-routing": ("grey", "-.", 1.0),
        "oracle-cascade": ("silver", "-.", 1.0),
    }
    entry = curve_of(res, curve)
    assert entry is not None
    for name, stats in entry["policies"].items():
        pts = stats["curve"]
        if name.startswith("single:"):
            if pts:
                ax.plot([pts[0]["cost"]], [pts[0]["accuracy"]], "o", color="dimgrey", ms=4)
                ax.annotate(
                    name[7:],
                    (pts[0]["cost"], pts[0]["accuracy"]),
                    fontsize=6,
                    xytext=(3, -8),
                    textcoords="offset points",
                )
            continue
        color, ls, lw = styles.get(name, ("purple", "-", 1.0))
        xs = [0.0] + [p["cost"] for p in pts]
        ys = [0.0] + [p["accuracy"] for p in pts]
        xs.append(max(1.0, xs[-1]))
        ys.append(ys[-1])
        ax.plot(xs, ys, ls, color=color, lw=lw, label=f"{name} (auc {stats['auc']:.3f})")
    best = entry["best_single"]["accuracy"]
    ax.axhline(best, color="dimgrey", lw=0.6)
    ax.axhline(best - 0.01, color="dimgrey", lw=0.6, ls=":")
    accs = [p["accuracy"] for s in entry["policies"].values() for p in s["curve"]]
    ax.set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.02))
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(f"mean cost per query / {res.result['reference_model']} (test)")
    ax.set_ylabel("test mean quality" if curve == "quality" else "test accuracy")
    what = " (mean quality)" if curve == "quality" else ""
    ax.set_title(f"{res.name}{what}: fitted on train, replayed on test")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _samples_flag(samples: list[SampleSpec] | None) -> str:
    if not samples:
        return ""
    return " --samples " + ",".join(str(k) if m is None else f"{m}@{k}" for m, k in samples)


def run_bench(
    traces: Path,
    out: Path,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
    on_pair: Callable[[str, int], None] | None = None,
    on_done: Callable[[PairResult], None] | None = None,
    samples: list[SampleSpec] | None = None,
) -> tuple[dict, list[str]]:
    """Run every pair, write bench.json, bench.md and the plots; return (json, skipped).

    A pair that cannot be loaded (PairError) is skipped with its message, passed to
    `on_skip` and listed in the outputs; the other pairs still run. If none can, that is
    an error (the first pair's message). `on_pair(name, n_policies)` is called as a pair
    starts, `progress(policy)` as each of its policies is done, `on_done(result)` as it
    finishes."""
    pairs, skipped = find_pairs(traces)
    if only:
        unknown = [n for n in only if n not in {p.name for p in pairs}]
        if unknown:
            raise InvalidInput(f"no complete pair named {unknown} in {traces}")
        pairs = [p for p in pairs if p.name in only]
    if not pairs:
        raise InvalidInput(f"no NAME-train.jsonl / NAME-test.jsonl pair in {traces}")
    results: list[PairResult] = []
    failed: list[str] = []
    for pair in pairs:
        try:
            result = run_pair(
                pair,
                on_policy=progress,
                on_start=None if on_pair is None else lambda n, name=pair.name: on_pair(name, n),
                samples=samples,
            )
        except PairError as exc:
            failed.append(f"skipped {pair.name}: {exc}")
            if on_skip:
                on_skip(failed[-1])
            continue
        out.mkdir(parents=True, exist_ok=True)
        plot_pair(result, out / f"{pair.name}.png")
        if curve_of(result, "quality") is not None:
            plot_pair(result, out / f"{pair.name}-quality.png", "quality")
        results.append(result)
        if on_done:
            on_done(result)
    if not results:
        raise PairError(f"no pair of {traces} could be benchmarked: {failed[0]}")
    skipped = sorted(skipped + failed)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    how = (
        f"Run: `cascade bench --traces {traces}{_samples_flag(samples)}` on "
        f"{platform.node() or 'this machine'} "
        f"(Python {platform.python_version()}, {stamp})."
        " Every policy is fitted and tuned on `NAME-train.jsonl` only; each train-selected "
        "setting is replayed on `NAME-test.jsonl`. Cost is mean cost per query as a fraction "
        "of the reference (most expensive) model's mean test cost; curves are Pareto envelopes "
        "of the test points, interpolated, anchored at (0, 0), flat after the last point."
    )
    doc = {
        "pairs": {r.name: r.result for r in results},
        "summary": summary(results),
        **(
            {"summary_quality": summary(results, "quality")}
            if any(curve_of(r, "quality") is not None for r in results)
            else {}
        ),
        "skipped": skipped,
        "cost_sources": {r.name: r.cost_source for r in results},
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "bench.md").write_text(write_markdown(results, skipped, how))
    return doc, skipped
