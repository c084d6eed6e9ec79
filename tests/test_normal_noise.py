"""The noise denoise_step draws in its kernel when given a seed (csrc/math/normal_noise.h).

Value k's noise is Box-Muller on the words of Philox4x32-10 at counter k / 4 and key seed.
Checked against an independent float64 implementation here (itself checked against the
Random123 known-answer vectors), for its distribution (moments, Kolmogorov-Smirnov,
correlations), and for being a pure function of (seed, k): the same bits whatever the thread
count, the batch layout or the device.
"""

import math

import numpy as np
import pytest
import torch

from softmix import ops

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int], rounds: int = 10):
    """The four output words for each 128-bit counter (a (n, 4) uint64 array of 32-bit words)."""
    c0, c1, c2, c3 = (counter[:, i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(rounds):
        p0, p1 = np.uint64(PHILOX_M0) * c0, np.uint64(PHILOX_M1) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + np.uint64(PHILOX_W0)) & MASK32, (k1 + np.uint64(PHILOX_W1)) & MASK32
    return np.stack([c0, c1, c2, c3], 1)


def reference_noise(seed: int, n: int) -> np.ndarray:
    """float64 noise of values 0 .. n-1 under ``seed``, from the formula in normal_noise.h."""
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    counter = np.stack([blocks & MASK32, blocks >> np.uint64(32), 0 * blocks, 0 * blocks], 1)
    words = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    u1 = ((words[:, 0::2] >> np.uint64(8)) + 1).astype(np.float64) / 2.0**24  # (0, 1]
    u2 = (words[:, 1::2] >> np.uint64(8)).astype(np.float64) / 2.0**24  # [0, 1)
    radius, angle = np.sqrt(-2 * np.log(u1)), 2 * np.pi * u2
    pairs = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)  # (blocks, 2, 2)
    return pairs.reshape(-1)[:n]


# a step whose x_prev is exactly sigma * noise: x_t = model_output = 0, x0 predicted directly
A_T, A_PREV = 0.25, 0.5
SIGMA = math.sqrt((1 - A_PREV) / (1 - A_T) * (1 - A_T / A_PREV))


def drawn_noise(shape, seed, dtype=torch.float32, device="cpu"):
    """The noise the kernel draws for a tensor of ``shape``, read back through x_prev."""
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    b = shape[0]
    a_t = torch.full((b,), A_T, dtype=torch.float64, device=device)
    a_prev = torch.full((b,), A_PREV, dtype=torch.float64, device=device)
    x_prev, _ = torch.ops.softmix.denoise_step(zeros, zeros, a_t, a_prev, None, 1.0, "sample", None, seed)
    return x_prev.double() / SIGMA


def fresh_seed(rng) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=rng))


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
    ids=["zeros", "ones", "pi"],
)
def test_reference_philox_matches_the_random123_known_answers(counter, key, expected):
    words = philox4x32_10(np.array([counter], dtype=np.uint64), key)
    assert tuple(int(w) for w in words[0]) == expected


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 7), (2, 4099), (5, 3, 11, 13), (1, 2 * 2048 + 6)],
    ids=["1", "odd", "crosses-chunks", "images", "one-long-row"],
)
def test_kernel_noise_matches_float64_reference(rng, shape):
    seed = fresh_seed(rng)
    got = drawn_noise(shape, seed).reshape(-1).numpy()
    expected = reference_noise(seed, got.size)
    # float32 polynomials for log, cos and sin: a few ulp of values of size up to 5.8
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)


def test_noise_is_standard_normal(rng):
    n = 1 << 20
    z = drawn_noise((4, n // 4), fresh_seed(rng)).reshape(-1)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # var(z^4) = 105 - 9
    # Kolmogorov-Smirnov against the normal CDF; 1.95 / sqrt(n) is the 0.1% critical value
    ordered = z.sort().values
    cdf = torch.special.ndtr(ordered)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ranks - cdf, cdf - (ranks - 1 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n), ks
    # neighbours (within and across Box-Muller pairs and Philox blocks) are uncorrelated
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)


def test_seeds_give_independent_noise(rng):
    seed = fresh_seed(rng)
    n = 1 << 16
    z = drawn_noise((1, n), seed)[0]
    for other in (seed + 1, seed ^ (1 << 40), fresh_seed(rng)):
        corr = torch.corrcoef(torch.stack([z, drawn_noise((1, n), other)[0]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (other, corr)
    assert torch.equal(z, drawn_noise((1, n), seed)[0])


def test_noise_depends_only_on_the_flat_index(rng):
    """The same bits whatever the batch layout (so the chunks the kernel draws in) and threads."""
    seed, n = fresh_seed(rng), 6 * 4099
    flat = drawn_noise((1, n), seed).reshape(-1)
    for shape in [(6, 4099), (n, 1), (2, 3, 4099), (3, 2 * 4099)]:
        assert torch.equal(drawn_noise(shape, seed).reshape(-1), flat), shape
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = drawn_noise((6, 4099), seed).reshape(-1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, flat)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_dtypes_draw_the_float32_noise(rng, dtype):
    seed = fresh_seed(rng)
    expected = drawn_noise((3, 101), seed)
    got = drawn_noise((3, 101), seed, dtype)
    tol = {torch.float64: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_drawn_noise_enters_the_step_like_given_noise(rng):
    """The seeded step is the step with the reference noise passed in; gradients unchanged."""
    b, k, seed = 4, 37, fresh_seed(rng)
    x = torch.randn(b, k, generator=rng, dtype=torch.float64).requires_grad_()
    m = torch.randn(b, k, generator=rng, dtype=torch.float64).requires_grad_()
    a_t = torch.rand(b, generator=rng, dtype=torch.float64) * 0.5 + 0.2
    a_prev = a_t + 0.1
    noise = torch.from_numpy(reference_noise(seed, b * k)).reshape(b, k)
    seeded = torch.ops.softmix.denoise_step(x, m, a_t, a_prev, None, 0.7, "epsilon", 1.0, seed)
    given = ops.denoise_step(x, m, a_t, a_prev, noise, 0.7, "epsilon", 1.0)
    for s, g in zip(seeded, given):
        torch.testing.assert_close(s, g, rtol=1e-6, atol=1e-6)
    grads_seeded = torch.autograd.grad(sum(t.square().sum() for t in seeded), (x, m))
    grads_given = torch.autograd.grad(sum(t.square().sum() for t in given), (x, m))
    for s, g in zip(grads_seeded, grads_given):
        torch.testing.assert_close(s, g, rtol=1e-6, atol=1e-6)


def test_eta_zero_ignores_the_seed(rng):
    x, m = torch.randn(2, 9, generator=rng), torch.randn(2, 9, generator=rng)
    a_t, a_prev = torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.9])
    seeded = torch.ops.softmix.denoise_step(x, m, a_t, a_prev, None, 0.0, "epsilon", None, fresh_seed(rng))
    unseeded = torch.ops.softmix.denoise_step(x, m, a_t, a_prev, None, 0.0, "epsilon", None, None)
    assert torch.equal(seeded[0], unseeded[0])


def test_noise_and_seed_together_are_rejected():
    x = torch.zeros(2, 3)
    a = torch.tensor([0.3, 0.3])
    with pytest.raises(ValueError, match="noise or seed"):
        torch.ops.softmix.denoise_step(x, x, a, a + 0.1, torch.zeros_like(x), 1.0, "epsilon", None, 5)


def test_wrapper_seeds_the_kernel_from_the_generator(rng):
    x, m = torch.randn(3, 50, generator=rng), torch.randn(3, 50, generator=rng)
    a_t, a_prev = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.4, 0.6, 1.0])
    first = ops.denoise_step(x, m, a_t, a_prev, generator=torch.Generator().manual_seed(3))[0]
    again = ops.denoise_step(x, m, a_t, a_prev, generator=torch.Generator().manual_seed(3))[0]
    other = ops.denoise_step(x, m, a_t, a_prev, generator=torch.Generator().manual_seed(4))[0]
    seed = ops.draw_seed(torch.Generator().manual_seed(3))
    raw = torch.ops.softmix.denoise_step(x, m, a_t, a_prev, None, 1.0, "epsilon", None, seed)[0]
    assert torch.equal(first, again) and torch.equal(first, raw)
    assert not torch.allclose(first[:2], other[:2])  # the last sample steps to alpha_bar = 1: no noise
    # without a generator: the default one, so torch.manual_seed makes a run reproducible
    torch.manual_seed(11)
    default = ops.denoise_step(x, m, a_t, a_prev)[0]
    torch.manual_seed(11)
    assert torch.equal(default, ops.denoise_step(x, m, a_t, a_prev)[0])


def test_wrapper_under_torch_compile_draws_noise_without_breaking_the_graph(rng):
    x, m = torch.randn(2, 8, generator=rng), torch.randn(2, 8, generator=rng)
    a_t, a_prev = torch.tensor([0.3, 0.5]), torch.tensor([0.6, 0.7])
    step = torch.compile(lambda x, m: ops.denoise_step(x, m, a_t, a_prev)[0], fullgraph=True, backend="eager")
    torch.manual_seed(0)
    first = step(x, m)
    assert first.shape == x.shape and torch.isfinite(first).all()
    assert not torch.equal(first, step(x, m))  # fresh noise per call


@pytest.mark.cuda
def test_cuda_draws_the_cpu_noise(rng):
    seed = fresh_seed(rng)
    for shape in [(3, 7), (2, 4099), (5, 3, 11, 13), (4, 64), (2, 3, 32, 32)]:  # odd rows and 16-byte packs
        cpu = drawn_noise(shape, seed)
        cuda = drawn_noise(shape, seed, device="cuda").cpu()
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)
