"""SparseAdam (paper App. M) against torch.optim.Adam / torch.optim.SparseAdam, laziness, and resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.train.optim import Adam, SparseAdam, make_optimizer

N, D = 12, 10


def _sae_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_E": torch.randn(N, D, generator=g),
        "b_E": torch.randn(N, generator=g),
        "W_D": torch.randn(N, D, generator=g),
        "b_D": torch.randn(D, generator=g),
    }


def _leaves(init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_(True) for k, v in init.items()}


def _sparse_adam(p: dict[str, torch.Tensor], mode: str = "per_row", lr: float = 1e-2) -> SparseAdam:
    return SparseAdam([{"params": [p["W_E"], p["b_E"], p["W_D"]], "row_sparse": True},
                       {"params": [p["b_D"]]}], lr=lr, bias_correction=mode)


def _grads(n_steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Dense gradients, nonzero in every row (so laziness is visible: inactive rows do have a gradient)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_E": (N, D), "b_E": (N,), "W_D": (N, D), "b_D": (D,)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n_steps)]


def _actives(n_steps: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N, generator=g)[: 1 + step % 5] for step in range(n_steps)]


def _set_grads(p: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    for k, v in grads.items():
        p[k].grad = v.clone()


def test_inactive_rows_are_bit_identical():
    p = _leaves(_sae_params())
    opt = _sparse_adam(p)
    grads, actives = _grads(6), _actives(6)
    for step in range(6):
        before = {k: p[k].detach().clone() for k in ("W_E", "b_E", "W_D")}
        moments = {k: {s: opt.state[p[k]][s].clone() for s in ("exp_avg", "exp_avg_sq", "step")}
                   for k in before if p[k] in opt.state}
        _set_grads(p, grads[step])
        opt.step(actives[step])
        inactive = torch.ones(N, dtype=torch.bool)
        inactive[actives[step]] = False
        for k, old in before.items():
            assert torch.equal(p[k].detach()[inactive], old[inactive])
            assert not torch.equal(p[k].detach()[~inactive], old[~inactive])
            state = opt.state[p[k]]
            if k in moments:
                for s in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(state[s][inactive], moments[k][s][inactive])
            else:  # first step: moments of inactive rows are still the zeros they started as
                assert not state["exp_avg"][inactive].any() and not state["exp_avg_sq"][inactive].any()
                assert not state["step"][inactive].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_row_equals_adam_on_each_rows_active_history(dtype):
    """Each row, with its own step count, is exactly Adam run on the gradients of the steps where it was active."""
    init = {k: v.to(dtype) for k, v in _sae_params().items()}
    p = _leaves(init)
    opt = _sparse_adam(p, "per_row", lr=3e-2)
    refs = {(k, r): init[k][r].clone().reshape(-1).requires_grad_(True)
            for k in ("W_E", "b_E", "W_D") for r in range(N)}
    ref_opts = {key: torch.optim.Adam([t], lr=3e-2) for key, t in refs.items()}
    grads, actives = _grads(10), _actives(10)
    for step in range(10):
        _set_grads(p, {k: v.to(dtype) for k, v in grads[step].items()})
        opt.step(actives[step])
        for r in actives[step].tolist():
            for k in ("W_E", "b_E", "W_D"):
                refs[k, r].grad = grads[step][k][r].to(dtype).reshape(-1).clone()
                ref_opts[k, r].step()
        for (k, r), t in refs.items():
            assert torch.equal(p[k].detach()[r].reshape(-1), t.detach()), (step, k, r)
    counts = torch.zeros(N, dtype=torch.int64)
    for a in actives:
        counts[a] += 1
    assert torch.equal(opt.state[p["W_E"]]["step"], counts)


def test_per_row_first_update_has_adams_first_step_size():
    """A row first active after many steps moves by ~lr per coordinate (Adam's first step), not (1-b1)/sqrt(1-b2)."""
    p = _leaves(_sae_params())
    opt = _sparse_adam(p, "per_row", lr=1e-3)
    for _ in range(50):
        _set_grads(p, {k: torch.ones_like(v) for k, v in p.items()})
        opt.step(torch.tensor([0]))
    before = p["W_E"].detach()[5].clone()
    _set_grads(p, {k: torch.ones_like(v) for k, v in p.items()})
    opt.step(torch.tensor([5]))
    torch.testing.assert_close(before - p["W_E"].detach()[5], torch.full((D,), 1e-3), rtol=1e-4, atol=0)


def test_per_tensor_equals_torch_sparse_adam():
    init = _sae_params()
    p = _leaves(init)
    opt = _sparse_adam(p, "per_tensor", lr=2e-2)
    q = _leaves(init)
    ref = torch.optim.SparseAdam([q["W_E"], q["b_E"], q["W_D"]], lr=2e-2)
    grads, actives = _grads(8), _actives(8)
    for step in range(8):
        _set_grads(p, grads[step])
        opt.step(actives[step])
        idx = torch.sort(actives[step]).values
        for k in ("W_E", "b_E", "W_D"):
            g = grads[step][k]
            # a hybrid COO gradient holding exactly the active rows (zeros included), as a sparse embedding gives
            q[k].grad = torch.sparse_coo_tensor(idx[None], g[idx], g.shape, check_invariants=True)
        ref.step()
        for k in ("W_E", "b_E", "W_D"):
            assert torch.equal(p[k].detach(), q[k].detach()), (step, k)
            assert torch.equal(opt.state[p[k]]["exp_avg"], ref.state[q[k]]["exp_avg"])
            assert torch.equal(opt.state[p[k]]["exp_avg_sq"], ref.state[q[k]]["exp_avg_sq"])
            assert int(opt.state[p[k]]["step"]) == ref.state[q[k]]["step"] == step + 1


def test_per_tensor_counts_every_step_even_without_active_rows():
    p = _leaves(_sae_params())
    opt = _sparse_adam(p, "per_tensor")
    _set_grads(p, _grads(1)[0])
    before = p["W_E"].detach().clone()
    opt.step(torch.tensor([], dtype=torch.int64))
    opt.step(torch.zeros(N, dtype=torch.bool))
    assert int(opt.state[p["W_E"]]["step"]) == 2
    assert torch.equal(p["W_E"].detach(), before)


def test_dense_params_equal_torch_adam_exactly():
    init = _sae_params()
    p, q = _leaves(init), _leaves(init)
    opt = _sparse_adam(p)
    ref = torch.optim.Adam([q["b_D"]], lr=1e-2)
    r, s = _leaves(init), _leaves(init)
    adam = make_optimizer("adam", [(t, k != "b_D") for k, t in r.items()], lr=1e-2)
    full_ref = torch.optim.Adam(list(s.values()), lr=1e-2, fused=True)  # make_optimizer's "adam" is fused
    u = _leaves(init)
    unfused = torch.optim.Adam(list(u.values()), lr=1e-2)  # ... and agrees with the default Adam to rounding
    assert isinstance(adam, torch.optim.Adam)
    grads, actives = _grads(7), _actives(7)
    for step in range(7):
        _set_grads(p, grads[step])
        _set_grads(r, grads[step])
        _set_grads(s, grads[step])
        _set_grads(u, grads[step])
        q["b_D"].grad = grads[step]["b_D"].clone()
        opt.step(actives[step])
        ref.step()
        adam.step(actives[step])  # active_rows accepted and ignored
        full_ref.step()
        unfused.step()
        assert torch.equal(p["b_D"].detach(), q["b_D"].detach())
        for k in r:
            assert torch.equal(r[k].detach(), s[k].detach())
            torch.testing.assert_close(r[k].detach(), u[k].detach(), rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[p["b_D"]][key], ref.state[q["b_D"]][key])


def _run(opt_factory, p, grads, actives, start, stop):
    opt = opt_factory(p)
    for step in range(start, stop):
        _set_grads(p, grads[step])
        opt.step(actives[step])
    return opt


@pytest.mark.parametrize("name,mode", [("sparseadam", "per_row"), ("sparseadam", "per_tensor"), ("adam", "per_row")])
def test_state_dict_round_trip_resumes_bit_exactly(name, mode):
    def factory(p):
        return make_optimizer(name, [(p["W_E"], True), (p["b_E"], True), (p["W_D"], True), (p["b_D"], False)],
                              lr=1e-2, bias_correction=mode)

    init = _sae_params()
    grads, actives = _grads(6), _actives(6)
    straight = _leaves(init)
    opt_straight = factory(straight)
    for step in range(6):
        _set_grads(straight, grads[step])
        opt_straight.step(actives[step])

    first = _leaves(init)
    opt_first = factory(first)
    for step in range(3):
        _set_grads(first, grads[step])
        opt_first.step(actives[step])
    buf = io.BytesIO()
    torch.save({"opt": opt_first.state_dict(), "params": {k: v.detach() for k, v in first.items()}}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _leaves(ckpt["params"])
    opt_resumed = factory(resumed)
    opt_resumed.load_state_dict(ckpt["opt"])
    if name == "sparseadam" and mode == "per_row":
        assert opt_resumed.state[resumed["W_E"]]["step"].dtype == torch.int64
        assert opt_resumed.state[resumed["W_E"]]["step"].shape == (N,)
    for step in range(3, 6):
        _set_grads(resumed, grads[step])
        opt_resumed.step(actives[step])
    for k in init:
        assert torch.equal(resumed[k].detach(), straight[k].detach()), k
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_resumed.state[resumed[k]][key], opt_straight.state[straight[k]][key])


def test_loaded_state_does_not_alias_the_callers_dict():
    p = _leaves(_sae_params())
    opt = _sparse_adam(p)
    _set_grads(p, _grads(1)[0])
    opt.step(torch.tensor([1, 2]))
    saved = copy.deepcopy(opt.state_dict())
    snapshot = copy.deepcopy(saved)
    q = _leaves(_sae_params())
    opt2 = _sparse_adam(q)
    opt2.load_state_dict(saved)
    _set_grads(q, _grads(1)[0])
    opt2.step(torch.tensor([1, 2]))
    for pid, st in snapshot["state"].items():
        for key, value in st.items():
            assert torch.equal(saved["state"][pid][key], value)


def test_load_state_dict_rejects_a_mode_mismatch():
    p = _leaves(_sae_params())
    opt = _sparse_adam(p, "per_tensor")
    _set_grads(p, _grads(1)[0])
    opt.step(torch.tensor([0]))
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["bias_correction"] = "per_row"
    with pytest.raises(RanklensError, match="step count"):
        _sparse_adam(_leaves(_sae_params()), "per_row").load_state_dict(state)


def test_active_rows_indices_mask_and_none_fallback_agree():
    init = _sae_params()
    grads, actives = _grads(5), _actives(5)
    runs = {}
    for form in ("indices", "mask", "topk_shaped", "none"):
        p = _leaves(init)
        opt = _sparse_adam(p)
        for step in range(5):
            g = {k: v.clone() for k, v in grads[step].items()}
            inactive = torch.ones(N, dtype=torch.bool)
            inactive[actives[step]] = False
            for k in ("W_E", "b_E", "W_D"):
                g[k][inactive] = 0  # what an SAE's gradient looks like: zero outside the active features
            _set_grads(p, g)
            a = actives[step]
            if form == "indices":
                opt.step(a)
            elif form == "mask":
                opt.step(~inactive)
            elif form == "topk_shaped":  # [tokens, k] with repeats, unsorted, int32
                opt.step(torch.stack([a, a.flip(0)]).to(torch.int32))
            else:
                opt.step()
        runs[form] = p
    for form in ("mask", "topk_shaped", "none"):
        for k in init:
            assert torch.equal(runs[form][k].detach(), runs["indices"][k].detach()), (form, k)


def test_closure_and_params_without_grad():
    p = _leaves(_sae_params())
    opt = _sparse_adam(p)
    before = {k: v.detach().clone() for k, v in p.items()}

    def closure():
        opt.zero_grad()
        loss = (p["W_E"][3] ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)  # torch-style positional closure; fallback: rows with a nonzero gradient
    assert loss is not None
    changed = (p["W_E"].detach() != before["W_E"]).any(dim=1)
    assert changed.tolist() == [r == 3 for r in range(N)]
    assert torch.equal(p["b_D"].detach(), before["b_D"])  # grad None after zero_grad: untouched


def test_adam_wrapper_runs_step_hooks_once():
    p = _leaves(_sae_params())
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # makes torch wrap Adam.step itself
    opt = make_optimizer("adam", [(t, False) for t in p.values()], lr=1e-2)
    assert isinstance(opt, Adam)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    _set_grads(p, _grads(1)[0])
    opt.step(torch.tensor([0]))
    assert calls == ["pre", "post"]


def test_bad_input_is_named():
    p = _leaves(_sae_params())
    with pytest.raises(RanklensError, match="bias_correction='per_batch'"):
        SparseAdam([p["W_E"]], lr=1e-3, bias_correction="per_batch")
    with pytest.raises(RanklensError, match="lr=-1"):
        SparseAdam([p["W_E"]], lr=-1.0)
    with pytest.raises(RanklensError, match="optimizer 'sgd'"):
        make_optimizer("sgd", [(p["W_E"], True)], lr=1e-3)
    with pytest.raises(RanklensError, match="row_sparse parameter of shape"):
        SparseAdam([{"params": [torch.zeros((), requires_grad=True)], "row_sparse": True}], lr=1e-3)
    opt = _sparse_adam(p)
    _set_grads(p, _grads(1)[0])
    with pytest.raises(RanklensError, match="index 12"):
        opt.step(torch.tensor([0, 12]))
    with pytest.raises(RanklensError, match="index -1"):
        opt.step(torch.tensor([-1]))
    with pytest.raises(RanklensError, match="mask of length 5"):
        opt.step(torch.ones(5, dtype=torch.bool))
    with pytest.raises(RanklensError, match="dtype torch.float32"):
        opt.step(torch.tensor([1.0]))
