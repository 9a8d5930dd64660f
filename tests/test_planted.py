"""The planted-conflict recipe (examples/planted.py): the unit test of the whole idea. Its ground truth
(``PLANTED``) was fixed in the recipe before any profile was run."""

from __future__ import annotations

import pytest
import torch

import recon
from benchmarks.planted import load_planted, val_mse


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model: one intra-op thread (two stall on a busy machine, see recon/_gram.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    return load_planted()


def _profile(P, seed: int, steps: int = 60) -> recon.ConflictProfile:
    torch.manual_seed(seed)
    model = P.build_model()
    return recon.profile(
        model, P.train_data(), P.losses, steps=steps, seed=seed, optimizer=P.optimizer(model.parameters())
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interference_ranks_the_planted_layer_first(planted, seed: int) -> None:
    prof = _profile(planted, seed)
    assert prof.layers[-1] == planted.NEAREST_OUTPUTS != planted.PLANTED  # deeper heads would miss it
    ranked = prof.scores(score="interference")
    assert ranked.index[0] == planted.PLANTED
    assert ranked["score"].iloc[0] > 0 and ranked.loc[planted.PLANTED, "p_top_k"] == 1.0


def _val_mse(P, layers: list[str], tasks: list[str] | None) -> float:
    return val_mse(P, layers, tasks, seed=0, epochs=2)


def test_splitting_the_planted_layer_closes_the_gap_and_a_random_layer_of_its_size_does_not(planted) -> None:
    P = planted
    rng = torch.Generator().manual_seed(0)
    control = P.SAME_SIZE[int(torch.randint(len(P.SAME_SIZE), (1,), generator=rng))]
    model = P.build_model()
    size = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in (P.PLANTED, control)}
    assert size[P.PLANTED] == size[control]
    single = _val_mse(P, [], ["a"]) + _val_mse(P, [], ["b"])
    unsplit = _val_mse(P, [], None)
    gap = unsplit - single
    assert gap > 0.5  # the bottleneck costs the joint model about half of each task's variance
    closed = {layer: (unsplit - _val_mse(P, [layer], None)) / gap for layer in (P.PLANTED, control)}
    assert closed[P.PLANTED] > 0.9
    assert closed[control] < 0.3


def test_the_recipe_is_valid_for_the_cli(planted) -> None:
    from recon import load_recipe

    recipe = load_recipe(planted.__file__)
    assert list(recipe.tasks) == ["a", "b"]
    x, y = recipe.first_batch()
    assert x.shape == (planted.BATCH_SIZE, planted.D_IN) and set(y) == {"a", "b"}
    U, V = planted.directions()
    assert torch.allclose(U.T @ V, torch.zeros(2, 2), atol=1e-6)  # the tasks read disjoint directions
