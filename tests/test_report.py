"""The study report: what it shows, and what it leaves out with the reason."""

import optuna

from adapruner.search.report import MIN_TRIALS_FOR_IMPORTANCES, importance_lines


def _study_with_completed(n: int) -> optuna.Study:
    """``n`` completed searched trials (value rising with x, y noise) and a baseline, which never counts."""
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(n):
        x, y = (i * 0.37) % 1, (i * 0.61) % 1
        study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions=dist, value=10 + 5 * x))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=9.0,
                                              user_attrs={"baseline": "flap", "draw": 0}))
    return study


def test_importances_are_omitted_below_the_threshold_with_the_reason():
    few = "\n".join(importance_lines(_study_with_completed(MIN_TRIALS_FOR_IMPORTANCES - 1)))
    assert f"Omitted: {MIN_TRIALS_FOR_IMPORTANCES - 1} searched trials completed" in few and "| x |" not in few
    enough = "\n".join(importance_lines(_study_with_completed(MIN_TRIALS_FOR_IMPORTANCES)))
    assert "Omitted" not in enough
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in enough.splitlines()
            if line.startswith("| x") or line.startswith("| y")}
    assert rows["x"] > rows["y"]  # the parameter the value depends on comes first


def test_the_console_speed_line_says_noise_and_never_glues_x_to_it():
    from adapruner.cli.search import speed_line

    cost = {"speedups": {"best": {"decode": 1.17, "peak_memory": 0.87}}, "rounds": 5,
            "models": {"best": {"decode_tokens_per_s": 17.1}},
            "spread": {"best": {"decode": {"median": 1.17, "low": 0.88, "high": 1.19, "noisy": True}}}}
    line = speed_line(cost)
    assert "1.17x (0.88-1.19) the unpruned model's over 5 rounds: too noisy" in line and "noisyx" not in line
    cost["spread"]["best"]["decode"] |= {"low": 1.15, "noisy": False}
    assert "1.17 (1.15-1.19)x the unpruned model's;" in speed_line(cost)


def test_a_configuration_is_described_with_its_scope_depth_and_steps():
    from adapruner.importance import Mixture
    from adapruner.plan import Allocation
    from adapruner.repair import Repair
    from adapruner.search.report import describe_config
    from adapruner.session import PruneConfig

    deep = PruneConfig(Mixture.single("flap"), (0, 1, 2), Allocation(scope="global", drop_layers=3), Repair("pool"), 2)
    text = describe_config(deep.to_dict())
    assert "one ranking across layers" in text and "3 whole layers dropped" in text and "in 2 steps" in text
    plain = describe_config(PruneConfig(Mixture.single("flap"), (0,), Allocation()).to_dict())
    assert "a budget per layer" in plain and "dropped" not in plain and "steps" not in plain
