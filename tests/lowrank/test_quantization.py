"""Block-wise 8-bit codes against float64 oracles: the maps, nearest rounding, error bounds, row-aligned blocks."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.quantization import (
    block_layout,
    code_map,
    dequantize_blockwise,
    quantize_blockwise,
    quantized_bytes,
    smallest_code,
)

from .helpers import gen


def _oracle_magnitudes(binades: int) -> torch.Tensor:
    """The documented map, built independently in float64: 0 and 2^e (1 + j/8) / 1.875 for the top ``binades``
    binades (e = 1 - binades .. 0), without the pattern e = 1 - binades, j = 0 (taken by zero)."""
    values = [0.0] + [2.0**e * (1 + j / 8) / 1.875 for e in range(1 - binades, 1) for j in range(8)][1:]
    return torch.tensor(sorted(values), dtype=torch.float64)


ORACLE = {True: _oracle_magnitudes(16), False: _oracle_magnitudes(32)}


def _spread(shape: tuple[int, ...], seed: int, signed: bool) -> torch.Tensor:
    """Values over 14 decades with exact zeros, float32."""
    g = gen(seed)
    magnitude = 10 ** (-12 * torch.rand(*shape, generator=g, dtype=torch.float64))
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * magnitude
    x[torch.rand(*shape, generator=g) < 0.05] = 0.0
    return (x if signed else x.abs()).float()


def _reference(x: torch.Tensor, signed: bool, block: int) -> dict[str, torch.Tensor]:
    """float64 oracle for a (rows, n) tensor with n a multiple of ``block``, every entry of x's shape: the block absmax,
    y = |x| / absmax, the nearest map entry (searchsorted on the midpoints) with x's sign, the distance from y to the
    closest midpoint, and the nearest-rounding error bound (half the gap around y) times absmax."""
    rows = x.double().reshape(x.shape[0], -1, block)
    absmax = rows.abs().amax(-1, keepdim=True).expand_as(rows)
    y = rows.abs() / torch.where(absmax > 0, absmax, 1.0)
    mags = ORACLE[signed]
    mids = (mags[1:] + mags[:-1]) / 2
    upper = torch.searchsorted(mags, y).clamp(max=len(mags) - 1)
    below, above = mids[(upper - 1).clamp(min=0)], mids[upper.clamp(max=len(mids) - 1)]
    out = {
        "absmax": absmax,
        "y": y,
        "nearest": mags[torch.searchsorted(mids, y)] * rows.sign(),
        "to_midpoint": torch.minimum((y - below).abs(), (y - above).abs()),
        "bound": (mags[upper] - mags[(upper - 1).clamp(min=0)]) / 2 * absmax,
    }
    return {key: value.reshape(x.shape) for key, value in out.items()}


@pytest.mark.parametrize("signed", [True, False])
def test_maps_match_their_documented_construction(signed):
    table = code_map(signed).double()
    assert table.shape == (256,) and table.dtype == torch.float64
    magnitudes = torch.unique(table.abs())
    torch.testing.assert_close(magnitudes, ORACLE[signed], rtol=2**-24, atol=0)
    assert table[0] == 0 and table.max() == 1.0 and table.min() == (-1.0 if signed else 0.0)
    assert smallest_code(signed) == pytest.approx(float(ORACLE[signed][1]), rel=1e-12)
    if signed:  # sign-magnitude: code 128 + k is -code k, and both zeros decode to 0
        torch.testing.assert_close(table[129:], -table[1:128], rtol=0, atol=0)
        assert table[128] == 0
    else:
        assert torch.all(table[1:] > table[:-1])


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_map_entry(signed):
    x = _spread((24, 512), seed=1, signed=signed)
    codes, absmax = quantize_blockwise(x, signed, block_size=128)
    ref = _reference(x, signed, 128)
    torch.testing.assert_close(absmax.double(), ref["absmax"][:, ::128], rtol=0, atol=0)
    got = code_map(signed).double()[codes.long()]
    mismatch = (got - ref["nearest"]).abs() > 1e-7 * ref["nearest"].abs()  # the map is float32
    # Rounding decisions agree except within float32 precision of a midpoint (y = x * 1.875 / absmax in float32).
    assert mismatch.float().mean() < 1e-3
    assert torch.all(ref["to_midpoint"][mismatch] <= 1e-6 * ref["y"][mismatch])


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_within_half_the_local_gap(signed):
    x = _spread((32, 768), seed=2, signed=signed)
    codes, absmax = quantize_blockwise(x, signed, block_size=256)
    back = dequantize_blockwise(codes, absmax, signed, block_size=256).double()
    ref = _reference(x, signed, 256)
    error, scale, magnitude = (back - x.double()).abs(), ref["absmax"], x.double().abs()
    assert torch.all(error <= ref["bound"] + 1e-6 * scale)  # 1e-6: float32 scaling and the rounded normalised map
    # The closed-form bounds of the module docstring.
    s = smallest_code(signed)
    above = magnitude >= s * scale
    assert torch.all(error[above] <= magnitude[above] / 16 * (1 + 1e-5))
    assert torch.all(error[~above] <= s / 2 * scale[~above] * (1 + 1e-5))
    torch.testing.assert_close(back.abs().reshape(32, 3, 256).amax(-1), scale[:, ::256], rtol=0, atol=0)  # max exact
    print(
        f"signed={signed}: max error / absmax {(error / scale.clamp(min=1e-300)).max():.4f}, max relative error "
        f"above the smallest code {(error[above] / magnitude[above]).max():.4f}"
    )


def test_signs_zeros_and_tiny_second_moments():
    x = torch.tensor([[0.0, -0.0, 1.0, -1.0, 0.3, -0.3, 1e-6, -1e-6, 1e-9, -1e-9, 0.5, -0.25]])
    codes, absmax = quantize_blockwise(x, True)
    back = dequantize_blockwise(codes, absmax, True)
    assert back[0, 0] == 0 and back[0, 1] == 0
    assert torch.all((back.sign() == x.sign()) | (back == 0))
    assert torch.all(back[0, 2:6].sign() == x[0, 2:6].sign())  # above the smallest code: signs survive
    assert torch.all(back[0, 6:10] == 0)  # 1e-6 and 1e-9 are below half the smallest code (1.8e-5)
    s = smallest_code(False)
    v = torch.tensor([[2.0, 2.0 * 1.5 * s, 2.0 * 0.45 * s, 0.0, -1e-3, -0.0, 2.0 * 1e-4, 2.0 * 1e-9]])
    codes, absmax = quantize_blockwise(v, False)
    back = dequantize_blockwise(codes, absmax, False)
    assert torch.all(back >= 0)  # even for negative inputs
    assert back[0, 1] > 0 and abs(back[0, 1] / v[0, 1] - 1) <= 1 / 16  # tiny, above the smallest code: kept
    assert back[0, 2] == 0  # below half the smallest code: zero
    assert abs(back[0, 6] / v[0, 6] - 1) <= 1 / 16 and abs(back[0, 7] / v[0, 7] - 1) <= 1 / 16


@pytest.mark.parametrize("shape,block_size", [((12, 300), 128), ((9, 64), 256), ((10, 3, 50), 64), ((7, 1), 4)])
def test_row_sharded_quantization_equals_whole(shape, block_size):
    x = torch.randn(*shape, generator=gen(3))
    codes, absmax = quantize_blockwise(x, True, block_size)
    assert absmax.shape == (shape[0], math.ceil(math.prod(shape[1:]) / block_size))
    for shards in (2, 3, 5):
        parts = [quantize_blockwise(chunk, True, block_size) for chunk in torch.chunk(x, shards, dim=0)]
        assert torch.equal(torch.cat([c for c, _ in parts]), codes)
        assert torch.equal(torch.cat([a for _, a in parts]), absmax)


def test_blocks_never_span_rows():
    x = torch.stack([torch.full((100,), 1e4), torch.linspace(1e-3, 2e-3, 100)])  # very different row scales
    codes, absmax = quantize_blockwise(x, True, block_size=256)
    back = dequantize_blockwise(codes, absmax, True)
    assert absmax.shape == (2, 1)
    torch.testing.assert_close(back[1], x[1], rtol=1 / 16, atol=0)  # row 1 keeps its own scale


def test_one_dimensional_and_layout_recovery():
    x = torch.randn(1000, generator=gen(4))
    codes, absmax = quantize_blockwise(x, True, block_size=256)
    assert codes.shape == (1000,) and codes.dtype == torch.uint8 and absmax.shape == (1, 4)
    assert quantized_bytes((1000,), 256) == codes.numel() + 4 * absmax.numel()
    assert torch.equal(dequantize_blockwise(codes, absmax, True), dequantize_blockwise(codes, absmax, True, 256))
    for n in range(1, 400):
        for block in (1, 2, 3, 7, 64, 128, 256, 500):
            blocks, length = block_layout(n, block)
            assert length <= block and (blocks - 1) * length < n <= blocks * length
            assert math.ceil(n / math.ceil(n / blocks)) == blocks  # the decoder's recovery from absmax's shape


def test_mismatched_scales_are_rejected_and_nan_stays_in_its_block():
    codes, absmax = quantize_blockwise(torch.randn(4, 512, generator=gen(5)), True, 256)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(codes, absmax[:2], True)
    with pytest.raises(ValueError, match="block_size"):
        dequantize_blockwise(codes, absmax, True, block_size=128)
    x = torch.randn(2, 512, generator=gen(6))
    x[0, 3] = float("nan")
    back = dequantize_blockwise(*quantize_blockwise(x, True, 256), True)
    assert torch.isnan(back[0, :256]).all() and torch.isfinite(back[0, 256:]).all() and torch.isfinite(back[1]).all()


def test_empty_and_all_zero_tensors():
    codes, absmax = quantize_blockwise(torch.zeros(3, 0), False)
    assert codes.shape == (3, 0) and absmax.shape == (3, 0)
    assert dequantize_blockwise(codes, absmax, False).shape == (3, 0)
    codes, absmax = quantize_blockwise(torch.zeros(2, 10), False)
    assert torch.equal(dequantize_blockwise(codes, absmax, False), torch.zeros(2, 10))
