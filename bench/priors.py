"""Derive the priors the package ships (adapruner/search/priors.json): where a search starts.

For each pair of built-in sources: one study of ``--trials`` searched trials on SmolLM2-135M at ``--ratio``,
calibrated and validated on the pair (seed ``--seed``, distinct from the seeds bench/generalise.py reports
on), its start informed by LLM-Pruner's and FLAP's configurations only (no priors yet). The priors are
the ``--per-study`` best searched finalists of each study (by the re-scored validation), recorded with the
sources the study saw: a search never starts from a prior that saw one of its held-out sources, so a
study that leaves a built-in source out starts only from the pair's priors that exclude it. Nothing here
reads a test part: the studies' choices are made by validation alone.

    python bench/priors.py            # 3 studies, about 12 minutes each on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from adapruner.data import BUILTIN_SOURCES
from adapruner.search import SearchJob, run_search
from adapruner.search.record import StudyKey, baseline_of
from adapruner.search.start import shipped_priors

PRIORS = Path(__file__).resolve().parents[1] / "adapruner" / "search" / "priors.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--per-study", type=int, default=3)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--test-windows", type=int, default=32)
    parser.add_argument("--baselines", default="",
                        help="baselines each study runs besides its trials (none by default: the priors are searched "
                             "trials, and the informed start already tries LLM-Pruner's and FLAP's configurations)")
    parser.add_argument("--storage", default="sqlite:///runs/bench-priors.db")
    args = parser.parse_args()
    if shipped_priors()["priors"]:
        raise SystemExit(f"{PRIORS} is not empty: empty its list first, so that no prior informs its own derivation")
    Path("runs").mkdir(exist_ok=True)
    priors = []
    for pair in itertools.combinations(BUILTIN_SOURCES, 2):
        calibration = tuple(f"builtin:{name}" for name in pair)
        job = SearchJob(model="smollm2-135m", calibration=calibration, heldout=(), target=args.ratio,
                        trials=args.trials, seed=args.seed, val_windows=args.val_windows,
                        test_windows=args.test_windows, start="informed", measure_cost=False,
                        baselines=tuple(name for name in args.baselines.split(",") if name))
        with tempfile.TemporaryDirectory(prefix="adapruner-priors-") as artifacts:
            study = run_search(job, args.storage, f"priors-{'-'.join(pair)}-s{args.seed}", artifact_dir=artifacts,
                               progress=False).study
        record = study.user_attrs[StudyKey.SELECTION]
        trials = study.get_trials(deepcopy=False)
        ranked = sorted(record["finalists"], key=lambda r: r["selection_ppl"])
        searched = [trials[r["trial"]] for r in ranked if baseline_of(trials[r["trial"]]) is None]
        for trial in searched[: args.per_study]:
            priors.append({"params": trial.params, "seen": list(calibration), "study": study.study_name,
                           "trial": trial.number, "val_ppl": trial.value})
        print(f"{study.study_name}: {len(searched[: args.per_study])} priors", flush=True)
    derivation = (f"python bench/priors.py --trials {args.trials} --ratio {args.ratio} --seed {args.seed} "
                  f"--per-study {args.per_study} --val-windows {args.val_windows}")
    PRIORS.write_text(json.dumps({
        "derivation": (f"{derivation}: for each pair of built-in sources, the best searched "
                       "finalists (by re-scored validation) of one study of SmolLM2-135M calibrated and validated on "
                       "the pair; 'seen' lists the pair, so no study whose held-out sources include one of them "
                       "starts from it"),
        "priors": priors}, indent=1) + "\n")
    print(f"wrote {PRIORS}")


if __name__ == "__main__":
    main()
