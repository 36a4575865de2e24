"""Iterative plans (``PruneConfig.iterations``): FLAP's score re-measured on the model pruned and repaired so far,
one equal share of the target per step, through the one pipeline (``PruningSession.prune``)."""

from __future__ import annotations

import optuna
import pytest
import torch
from helpers import make_documents, make_tiny_model
from test_repair import logits

from adapruner.data import build_pool, split_documents
from adapruner.errors import AdaPrunerError
from adapruner.importance import GroupScores, Mixture
from adapruner.plan import Allocation, params_to_remove
from adapruner.prune import prune_model
from adapruner.repair import Repair, repair_pruned
from adapruner.search.space import SearchSpace, cluster_pool, suggest_config
from adapruner.session import PruneConfig, PruningSession
from adapruner.structure import decoder_layers, layer_linears

FLAP = Mixture.single("flap")


@pytest.fixture
def session(tiny_tokenizer):
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tiny_tokenizer, [(source, 12)], seq_len=32)
    return PruningSession(make_tiny_model(), tiny_tokenizer, pool, [source], train_sources=[source],
                          max_eval_windows=6, progress=False, cache_statistics=False, repair_windows=12)


def reference_scores(session, plan, pruned, subset) -> GroupScores:
    """FLAP's WIFV of what ``pruned`` keeps, written out from its definition: each kept o_proj/down_proj input
    column's variance over the subset's tokens times its weight column's squared norm; o_proj's squared,
    standardised over the layer's kept columns and averaged per group; down_proj's standardised."""
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = [layer_linears(layer)[m].register_forward_pre_hook(
        lambda _mod, args, key=(p, m): inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for p, layer in enumerate(decoder_layers(pruned)) for m in ("o_proj", "down_proj")]
    with torch.no_grad():
        pruned(input_ids=session.pool.windows[list(subset)])
    for handle in handles:
        handle.remove()
    attn, mlp = [], []
    for i, (shape, lp) in enumerate(zip(session.structure.layers, plan.layers, strict=True)):
        groups, channels = torch.full((shape.n_groups,), -torch.inf), torch.full((shape.n_channels,), -torch.inf)
        p = plan.kept_layers.index(i)
        linears = layer_linears(decoder_layers(pruned)[p])
        f = {m: torch.cat(inputs[(p, m)]).double().var(0, unbiased=False)
             * linears[m].weight.detach().double().square().sum(0) for m in ("o_proj", "down_proj")}
        o = f["o_proj"].square()
        groups[list(lp.keep_groups)] = ((o - o.mean()) / o.std()).view(len(lp.keep_groups), -1).mean(1).float()
        channels[list(lp.keep_channels)] = ((f["down_proj"] - f["down_proj"].mean()) / f["down_proj"].std()).float()
        attn.append(groups)
        mlp.append(channels)
    return GroupScores(attn, mlp)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_two_iterations_rank_the_second_half_on_the_pruned_and_repaired_model(session, scope):
    subset = tuple(range(len(session.pool)))
    config = PruneConfig(FLAP, subset, Allocation(scope=scope), Repair("pool"), iterations=2)
    model, plan = session.prune(config, 0.3)
    # the same, step by step: half the parameters by FLAP's score of the dense model, repaired, then the rest
    one_step = PruneConfig(FLAP, subset, Allocation(scope=scope), Repair("pool"))
    half = round(params_to_remove(session.structure, 0.3) / 2)
    first, first_plan = session.prune(one_step, half)
    scores = reference_scores(session, first_plan, first, subset)
    expected_plan = session.plan(one_step, 0.3, scores)
    assert plan == expected_plan
    expected = repair_pruned(prune_model(session.model, plan), session.model, plan, session.moments, Repair("pool"))
    assert torch.equal(logits(model), logits(expected))
    # what the first step removed stays removed, and the whole target is met as in one step
    for lp, kept in zip(plan.layers, first_plan.layers, strict=True):
        assert set(lp.keep_groups) <= set(kept.keep_groups) and set(lp.keep_channels) <= set(kept.keep_channels)
    assert plan.removed_params == session.prune(one_step, 0.3)[1].removed_params
    assert plan != session.prune(one_step, 0.3)[1]  # the second ranking is not the dense model's


def test_remeasured_scores_match_their_definition(session):
    subset = (0, 2, 4, 6)
    config = PruneConfig(FLAP, subset, Allocation(scope="global"), Repair("pool"))
    pruned, plan = session.prune(config, 0.25)
    got, want = session.remeasured(config, plan, pruned), reference_scores(session, plan, pruned, subset)
    for a, b in zip(got.attn + got.mlp, want.attn + want.mlp, strict=True):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a[~torch.isinf(a)], b[~torch.isinf(b)], rtol=1e-4, atol=1e-4)


def test_dropped_layers_go_at_the_first_step_and_the_target_is_met(session):
    subset = tuple(range(len(session.pool)))
    config = PruneConfig(FLAP, subset, Allocation(scope="global", drop_layers=1), Repair("pool"), iterations=3)
    _, plan = session.prune(config, 0.4)
    single = session.prune(PruneConfig(FLAP, subset, Allocation(scope="global", drop_layers=1), Repair("pool")),
                           0.4)[1]
    assert plan.dropped == single.dropped and len(plan.dropped) == 1
    assert abs(plan.removed_params - single.removed_params) <= max(s.channel_params for s in session.structure.layers)


def test_iterations_need_flaps_score_and_are_stored():
    with pytest.raises(AdaPrunerError, match="iterations > 1 re-measure FLAP's score"):
        PruneConfig(Mixture.single("magnitude_l2"), (0,), iterations=2)
    with pytest.raises(AdaPrunerError, match="iterations must be an integer >= 1"):
        PruneConfig(FLAP, (0,), iterations=0)
    config = PruneConfig(FLAP, (0, 1), Allocation(scope="global"), Repair("pool"), iterations=3)
    assert PruneConfig.from_dict(config.to_dict()) == config
    stored = config.to_dict()
    del stored["iterations"]  # stored before iterations existed: one step
    assert PruneConfig.from_dict(stored).iterations == 1


def test_the_space_searches_iterations_with_flaps_score_only(session):
    clusters = cluster_pool(torch.randn(len(session.pool), 8), 2)
    n_layers = len(session.structure.layers)
    for score, expected in (("flap", 3), ("mixture", 1)):
        space = SearchSpace(fixed={"score": score, "iterations": 3})
        trial = optuna.create_study().ask()
        assert suggest_config(trial, space, clusters, n_layers).iterations == expected
    with pytest.raises(AdaPrunerError, match="iterations must be 1 <= min <= max"):
        SearchSpace(iterations=(0, 2))
    assert SearchSpace(iterations=(1, 1), fixed={"score": "flap"}).iterations == (1, 1)


def test_prune_refuses_iterations_without_flaps_score_before_loading(capsys, monkeypatch):
    from test_cli import run

    import adapruner.session as session_module

    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, _, err = run(capsys, "prune", "--model", "smollm2-135m", "--metric", "magnitude_l2", "--iterations", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "use the metric flap" in err
