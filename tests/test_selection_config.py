"""The selection registry and the run config's `selection` union derived from it: options, pool-size checks."""

import inspect

import numpy as np
import pytest
from pydantic import ValidationError

from ampo.config import RunConfig, load_config
from ampo.selection import REGISTRY, parse_options, select, select_batch, selector_options


def run_config(selection: dict, n: int = 8) -> RunConfig:
    return RunConfig.model_validate({"policy": "x", "generation": {"n": n}, "selection": selection})


def keyword_options(fn, skip: str) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != skip}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_each_row_agrees_with_its_functions(method):
    # the options model is the only list of a method's options and the only place of their defaults
    row = REGISTRY[method]
    fields = set(row.options.model_fields)
    assert keyword_options(row.reference, "seed") == fields
    assert keyword_options(row.batched, "seeds") == fields
    for fn in (row.reference, row.batched):
        params = inspect.signature(fn).parameters
        assert all(params[name].default is inspect.Parameter.empty for name in fields), fn.__name__
    assert selector_options(method) == row.options().model_dump()


def test_random_with_k_at_least_n_is_refused_at_validation():
    # random draws k negatives among the N-1 others, like the AMPO methods: k=8 of n=8 cannot be filled
    for k in (8, 9):
        with pytest.raises(ValidationError, match=r"selection.method='random' \(k=\d\) needs at least \d+ "
                                                  r"responses per prompt, but generation.n=8"):  # fmt: skip
            run_config({"method": "random", "k": k})
    assert run_config({"method": "random", "k": 7}).selection.k == 7
    # the methods that ignore k do not need k + 1 responses; top_bottom needs 2m
    assert run_config({"method": "extremes", "k": 9}).selection.k == 9
    with pytest.raises(ValidationError, match=r"'top_bottom' \(k=1, m=5\) needs at least 10 responses"):
        run_config({"method": "top_bottom", "k": 1, "m": 5})
    assert run_config({"method": "top_bottom", "k": 1, "m": 4}).selection.m == 4


def test_optselect_points_is_settable_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("policy: x\ngeneration: {n: 8}\nselection:\n  method: optselect\n  k: 3\n  points: candidates\n")
    sel = load_config(path).selection
    assert sel.options() == {"points": "candidates", "weight_temperature": 1.0, "solver": "local_search"}
    # and it reaches the selector: the cost is the one of points="candidates" (the positive's weight 0)
    rng = np.random.default_rng(0)
    rewards, emb = rng.standard_normal((1, 8)), rng.standard_normal((1, 8, 3))
    (batched,) = select_batch(sel.method, rewards, emb, sel.k, **sel.options())
    assert batched == select("optselect", rewards[0], emb[0], 3, points="candidates")
    assert batched.cost < select("optselect", rewards[0], emb[0], 3, points="all").cost


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"method": "coreset", "solver": "exact"}, r"selection.coreset.solver\n  Extra inputs are not permitted"),
        ({"method": "bottomk", "m": 2}, r"selection.bottomk.m\n  Extra inputs are not permitted"),
        ({"method": "optselect", "points": "some"}, r"Input should be 'all' or 'candidates'"),
        ({"method": "coreset", "n_init": True}, r"selection.coreset.n_init"),
        ({"method": "optselect", "weight_temperature": 0}, r"greater than 0"),
        ({"method": "foo"}, r"Input tag 'foo' .* expected tags: 'bottomk', 'coreset'"),
        ({"method": "coreset", "min_reward_spread": -1}, r"greater than or equal to 0"),
        ({"method": "coreset", "potential": {"fraction": 0}}, r"selection.coreset.potential.fraction"),
    ],
)
def test_an_option_the_method_does_not_take_is_refused(selection, message):
    with pytest.raises(ValidationError, match=message):
        run_config(selection)


def test_method_defaults_to_coreset_and_each_config_has_only_its_options():
    sel = run_config({"k": 3}).selection
    assert sel.method == "coreset" and sel.options() == {"cluster_on": "candidates", "n_init": 10, "max_iter": 100}
    assert run_config({"method": "bottomk", "k": 3}).selection.options() == {}
    assert run_config({"method": "top_bottom", "k": 1, "m": 3}).selection.options() == {"m": 3}
    assert RunConfig(policy="x").selection == run_config({}).selection  # one default, written once


def test_function_api_options_name_the_bad_value():
    with pytest.raises(ValueError, match=r"n_init=True must be an int >= 1"):
        parse_options("coreset", {"n_init": True})
    with pytest.raises(ValueError, match=r"weight_temperature=inf must be a finite number > 0"):
        parse_options("optselect", {"weight_temperature": float("inf")})
    assert parse_options("coreset", {"n_init": np.int64(3)}).n_init == 3


def test_batched_errors_name_the_prompt_id():
    rng = np.random.default_rng(1)
    rewards, emb = rng.standard_normal((3, 5)), rng.standard_normal((3, 5, 2))
    ids = ["p-a", "p-b", "p-c"]
    with pytest.raises(ValueError, match=r"k=5 negatives need .*; prompt id 'p-a': N=5$"):
        select_batch("bottomk", rewards, emb, 5, prompt_ids=ids)
    rewards[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"^prompt id 'p-c': rewards must be finite; rewards\[1\]=nan$"):
        select_batch("bottomk", rewards, emb, 2, prompt_ids=ids)
    with pytest.raises(ValueError, match=r"^prompt 0: top_bottom with these options needs a pool of at least 6"):
        select_batch("top_bottom", rewards[:2], emb[:2], 1, m=3)
    with pytest.raises(ValueError, match=r"prompt_ids must name each of the 3 prompts; got 2 ids"):
        select_batch("bottomk", rewards, emb, 2, prompt_ids=ids[:2])


def test_the_json_schema_accepts_and_refuses_what_python_does():
    # Prefect's server validates deployment parameters by RunConfig's JSON schema, where the union is a oneOf:
    # a mapping without `method` must match exactly one branch (coreset's), as Python validation defaults it
    import jsonschema

    schema = RunConfig.model_json_schema()
    for selection in ({"k": 3}, {"k": 3, "n_init": 2}, {"method": "optselect", "points": "candidates"},
                      {"method": "bottomk"}):  # fmt: skip
        jsonschema.validate({"policy": "x", "selection": selection}, schema)
        run_config(selection)
    for selection in ({"method": "coreset", "solver": "exact"}, {"k": 3, "m": 2}, {"method": "foo"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"policy": "x", "selection": selection}, schema)
        with pytest.raises(ValidationError):
            run_config(selection)
