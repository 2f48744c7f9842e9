"""POET's math against independent float64 oracles: the Cayley-Neumann closed form, the activation-side forward
against the materialised R W0 P, the parameter count formula, merges that change no output, and a spectrum that
training leaves in place."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowrank.poet import (
    PoetConfig,
    PoetMergeError,
    apply_poet,
    merge_due,
    merge_poet,
    normalized_gaussian,
    poet_modules,
)
from lowrank.poet_cayley import cayley_neumann, orthogonality_error, skew_symmetric
from lowrank.poet_linear import POETLinear


def _skew(b: int, norm: float, seed: int) -> torch.Tensor:
    """A (1, b, b) skew-symmetric float64 matrix with spectral norm ``norm``."""
    a = torch.randn(b, b, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q = a - a.T
    return (q * norm / torch.linalg.matrix_norm(q, ord=2)).unsqueeze(0)


@pytest.mark.parametrize("norm", [0.05, 0.1, 0.2, 0.4])
@pytest.mark.parametrize("terms", [2, 3, 4])
def test_neumann_product_equals_the_cayley_map_times_the_truncation(norm: float, terms: int) -> None:
    q = _skew(16, norm, seed=int(norm * 100) + terms)
    eye = torch.eye(16, dtype=torch.float64)
    cayley = (eye + q[0]) @ torch.linalg.inv(eye - q[0])  # C(Q) by an explicit inverse
    closed = cayley @ (eye - torch.linalg.matrix_power(q[0], terms + 1))
    got = cayley_neumann(q, terms)[0]
    torch.testing.assert_close(got, closed, rtol=0, atol=1e-13)
    # the orthogonality error is the closed form's: (I - Q^(k+1))^T (I - Q^(k+1)) - I
    trunc = eye - torch.linalg.matrix_power(q[0], terms + 1)
    expected = torch.linalg.matrix_norm(trunc.T @ trunc - eye, ord=2)
    assert float(orthogonality_error(cayley_neumann(q, terms))) == pytest.approx(float(expected), rel=1e-6, abs=1e-15)
    bound = norm ** (2 * terms + 2) if terms % 2 == 0 else 2 * norm ** (terms + 1) + norm ** (2 * terms + 2)
    assert float(expected) <= bound * (1 + 1e-6) + 1e-15


def test_skew_symmetric_layout() -> None:
    vec = torch.arange(1.0, 7.0).unsqueeze(0)  # b = 4: 6 entries
    q = skew_symmetric(vec, 4)[0]
    assert torch.equal(q, -q.T) and torch.equal(torch.diagonal(q), torch.zeros(4))
    assert q[0, 1] == 1 and q[0, 3] == 3 and q[1, 2] == 4 and q[2, 3] == 6


def _oracle_rotation(perm: torch.Tensor, q_vec: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    """M = Psi^T diag(R_k(Q_1), .., I) Psi in float64, built entry by entry (no code of the module under test)."""
    d = perm.numel()
    blocks = []
    for vec in q_vec.double():
        q = torch.zeros(b, b, dtype=torch.float64)
        k = 0
        for i in range(b):
            for j in range(i + 1, b):
                q[i, j], q[j, i] = vec[k], -vec[k]
                k += 1
        series = sum(torch.linalg.matrix_power(q, p) for p in range(terms + 1))
        blocks.append((torch.eye(b, dtype=torch.float64) + q) @ series)
    diag = torch.eye(d, dtype=torch.float64)
    for index, block in enumerate(blocks):
        diag[index * b : (index + 1) * b, index * b : (index + 1) * b] = block
    psi = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d):
        psi[i, int(perm[i])] = 1.0
    return psi.T @ diag @ psi


@pytest.mark.parametrize(("m", "n", "b"), [(12, 8, 4), (10, 7, 3), (6, 16, 5)])
def test_activation_side_forward_equals_the_materialised_weight(m: int, n: int, b: int) -> None:
    torch.manual_seed(0)
    w0 = torch.randn(m, n, dtype=torch.float64)
    layer = POETLinear(w0, b, 4, seed=7, name="layer.weight", bias=torch.randn(m, dtype=torch.float64))
    with torch.no_grad():
        layer.q_out.normal_(0, 0.05)
        layer.q_in.normal_(0, 0.05)
    r = _oracle_rotation(layer.perm_out, layer.q_out, b, 4)
    p = _oracle_rotation(layer.perm_in, layer.q_in, b, 4)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    expected = x @ (r @ w0 @ p).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.effective_weight(), r @ w0 @ p, rtol=0, atol=1e-12)
    dense_r, dense_p = layer.dense_rotations()
    torch.testing.assert_close(dense_r, r, rtol=0, atol=1e-13)
    torch.testing.assert_close(dense_p, p, rtol=0, atol=1e-13)
    # the last m mod b permuted outputs are not rotated: rows of R there are rows of the identity
    untouched = layer.perm_out[(m // b) * b :]
    torch.testing.assert_close(r[untouched][:, untouched], torch.eye(len(untouched), dtype=torch.float64))


@pytest.mark.parametrize("shape", [(512, 512), (1376, 512), (512, 1376)])
@pytest.mark.parametrize("b", [256, 128, 64])
def test_trainable_count_matches_the_formula(shape: tuple[int, int], b: int) -> None:
    layer = POETLinear(torch.zeros(shape), b, 4, seed=0, name="w")
    m, n = shape
    assert layer.trainable_count() == (m // b + n // b) * b * (b - 1) // 2
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == layer.trainable_count()
    assert not layer.weight0.requires_grad


class _Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 12, dtype=dtype)
        self.up_proj = nn.Linear(12, 24, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(24, 12, bias=False, dtype=dtype)
        self.head = nn.Linear(12, 20, bias=False, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.down_proj(torch.relu(self.up_proj(h))))


TARGETS = [r"\bup_proj\b", r"\bdown_proj\b"]


def test_with_zero_generators_the_model_is_the_original_with_w0() -> None:
    original = _Tiny(torch.float64)
    tokens = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    expected = original(tokens)
    names = apply_poet(original, PoetConfig(block_size=4, init="normal"), TARGETS, seed=3)
    assert names == ["up_proj.weight", "down_proj.weight"]
    assert [type(m) for _, m in poet_modules(original)] == [POETLinear, POETLinear]
    torch.testing.assert_close(original(tokens), expected, rtol=0, atol=1e-12)


def test_normalized_init_has_unit_rows_and_follows_the_randomness_rule() -> None:
    a, b = _Tiny(), _Tiny()
    torch.manual_seed(123)  # the global RNG plays no part
    apply_poet(a, PoetConfig(block_size=4), TARGETS, seed=5)
    apply_poet(b, PoetConfig(block_size=4), TARGETS, seed=5)
    w = a.up_proj.weight0
    torch.testing.assert_close(w.double().norm(dim=1), torch.ones(24, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(w, b.up_proj.weight0) and torch.equal(a.up_proj.perm_in, b.up_proj.perm_in)
    assert not torch.equal(w, normalized_gaussian((24, 12), 6, "up_proj.weight", torch.float32))


def test_targets_that_match_nothing_are_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer.lowrank.targets: pattern\(s\) \['q_proj'\] match no nn.Linear"):
        apply_poet(_Tiny(), PoetConfig(block_size=4), ["up_proj", "q_proj"], seed=0)
    with pytest.raises(ValueError, match=r"optimizer.poet.init: invalid value 'xavier'; accepted: normalized"):
        apply_poet(_Tiny(), PoetConfig(block_size=4, init="xavier"), TARGETS, seed=0)


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: PoetConfig,
    steps: int,
    errors: list[float] | None = None,
) -> list[int]:
    """``steps`` optimizer steps with merges on schedule; ``errors`` gets the orthogonality error before each merge."""
    merges = []
    for step in range(steps):
        tokens = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(step))
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if merge_due(step, config):
            if errors is not None:
                errors.append(max(float(m.orthogonality_error()) for _, m in poet_modules(model)))
            merge_poet(model, optimizer, step + 1)
            merges.append(step)
    return merges


def test_a_merge_changes_no_output_zeroes_q_redraws_permutations_and_resets_state() -> None:
    model = _Tiny()
    config = PoetConfig(block_size=4, merge_every=1000)
    apply_poet(model, config, TARGETS, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    _train(model, optimizer, config, 5)
    layer = model.up_proj
    assert float(layer.q_out.detach().abs().max()) > 0 and optimizer.state[layer.q_out]["step"] == 5
    tokens = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(9))
    before = model(tokens).detach()
    perm_before, q_objects = layer.perm_in.clone(), (layer.q_out, layer.q_in)
    assert merge_poet(model, optimizer, step=5) == ["up_proj", "down_proj"]
    torch.testing.assert_close(model(tokens), before, rtol=1e-5, atol=1e-5)
    assert (layer.q_out, layer.q_in) == q_objects  # the same Parameter objects
    assert float(layer.q_out.detach().abs().max()) == 0 and float(layer.q_in.detach().abs().max()) == 0
    assert not torch.equal(layer.perm_in, perm_before)
    assert torch.equal(layer.perm_in[layer.inv_in], torch.arange(12))
    assert layer.q_out not in optimizer.state and model.embed.weight in optimizer.state
    optimizer.step()  # state created afresh: bias correction restarts
    assert optimizer.state[layer.q_out]["step"] == 1


def test_training_with_merges_keeps_the_spectrum_of_w0() -> None:
    model = _Tiny()
    config = PoetConfig(block_size=4, merge_every=6, lr=0.01)
    apply_poet(model, config, TARGETS, seed=2)
    initial = {n: torch.linalg.svdvals(m.weight0.double()) for n, m in poet_modules(model)}
    start = {n: m.weight0.detach().clone() for n, m in poet_modules(model)}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.endswith(("q_out", "q_in"))], "lr": config.lr},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("q_out", "q_in"))]},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.0)
    errors: list[float] = []
    assert _train(model, optimizer, config, 20, errors) == [5, 11, 17]
    errors.append(max(float(m.orthogonality_error()) for _, m in poet_modules(model)))  # of the final R W0 P
    assert len(errors) == 4 and min(errors[:3]) > 0
    for name, layer in poet_modules(model):
        assert not torch.equal(layer.weight0, start[name])  # training moved the weight
        sv = torch.linalg.svdvals(layer.effective_weight())
        drift = float(((sv - initial[name]).abs() / initial[name]).max())
        # every merge multiplies W0 by R and P; with ||G^T G - I|| <= e per block a singular value moves by a factor
        # within [sqrt(1 - e), sqrt(1 + e)] per factor: 4 rotations pairs (3 merges and the final R W0 P) move it by at
        # most about 4 e, plus the fp32 rounding of the stored W0 (1e-6 covers it)
        assert drift <= 4 * max(errors) + 1e-6, (name, drift, max(errors))
    assert math.isfinite(sum(errors))


def _dense_error(layer: POETLinear) -> float:
    """max(||R^T R - I||_2, ||P^T P - I||_2) of the materialised rotations, in float64."""
    errors = []
    for rotation in layer.dense_rotations(torch.float64):
        eye = torch.eye(rotation.shape[0], dtype=torch.float64)
        errors.append(float(torch.linalg.matrix_norm(rotation.T @ rotation - eye, ord=2)))
    return max(errors)


def test_a_merge_past_the_series_range_is_refused_and_changes_nothing() -> None:
    model = _Tiny()
    apply_poet(model, PoetConfig(block_size=4), TARGETS, seed=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    config = PoetConfig(block_size=4, merge_every=5)
    _train(model, optimizer, config, 3)
    with torch.no_grad():  # up_proj's generators far past ||Q||_2 = 1, down_proj's small
        model.up_proj.q_out.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        model.down_proj.q_out.mul_(0.01)
    bad = _dense_error(model.up_proj)
    assert bad > PoetConfig().max_merge_error and _dense_error(model.down_proj) < 1e-6
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    for threshold in (PoetConfig().max_merge_error, bad * 0.99):
        config = PoetConfig(block_size=4, merge_every=5, max_merge_error=threshold)
        with pytest.raises(PoetMergeError, match=r"up_proj has orthogonality error .* above optimizer.poet.max_merge"):
            merge_poet(model, optimizer, 5, config)
        # nothing merged: not even down_proj, which was due too; the optimizer state is untouched
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert optimizer.state.keys() == state_before.keys()
        assert all(torch.equal(optimizer.state[p][k], v) for p, s in state_before.items() for k, v in s.items())
    # the threshold compares the materialised rotations' error: just above it, both due layers merge
    config = PoetConfig(block_size=4, merge_every=5, max_merge_error=bad * 1.01)
    assert merge_poet(model, optimizer, 5, config) == ["up_proj", "down_proj"]
    assert model.up_proj.q_out not in optimizer.state
    assert PoetConfig(max_merge_error=0.0).problems() == [
        "optimizer.poet.max_merge_error: invalid value 0.0; accepted: a finite number > 0"
    ]


def test_bf16_layers_compute_their_blocks_in_float32_even_under_autocast() -> None:
    layer = POETLinear(torch.randn(24, 16, dtype=torch.bfloat16), 8, 4, seed=0, name="w")
    with torch.no_grad():
        layer.q_out.normal_(0, 0.05)
        layer.q_in.normal_(0, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_out, g_in = layer.blocks()
        y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert g_out.dtype == g_in.dtype == torch.float32 and y.dtype == torch.bfloat16
    # the float32 series is orthogonal to float32 rounding; the same series in bf16 is off by about 1e-2
    assert float(layer.orthogonality_error()) < 1e-5
    q = skew_symmetric(layer.q_out.detach(), 8)  # bf16
    assert float(orthogonality_error(cayley_neumann(q, 4).double())) > 1e-3
