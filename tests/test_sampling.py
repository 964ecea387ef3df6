import math

import pytest
import torch

from modules import sampling


def test_dev_schedule_at_1024_uses_mu_1_15():
    seq_len = (1024 // 16) * (1024 // 16)
    steps = sampling.get_schedule(4, seq_len, shift=True)
    mu = 1.15  # BFL's line through (256, 0.5) and (4096, 1.15) at L = 4096
    plain = torch.linspace(1, 0, 5).tolist()
    expected = [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in plain]
    assert steps[0] == 1.0 and steps[-1] == 0.0
    assert steps == pytest.approx(expected, abs=1e-6)
    assert steps[2] > 0.5  # shifted towards high noise


def test_mu_is_linear_in_sequence_length():
    f = sampling.get_lin_function()
    assert f(256) == pytest.approx(0.5) and f(4096) == pytest.approx(1.15)
    assert f(2176) == pytest.approx((0.5 + 1.15) / 2)


def test_schnell_schedule_is_unshifted():
    steps = sampling.get_schedule(4, 4096, shift=False)
    assert steps == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 16, 8, 12)  # latents of a 64x96 image
    packed = sampling.pack(x)
    assert packed.shape == (2, 4 * 6, 64)
    # token 1 is patch (row 0, col 1); channels are ordered c, ph, pw
    assert torch.equal(packed[0, 1, :4], torch.stack([x[0, 0, 0, 2], x[0, 0, 0, 3], x[0, 0, 1, 2], x[0, 0, 1, 3]]))
    assert torch.equal(sampling.unpack(packed, 64, 96), x)


def test_ids():
    ids = sampling.img_ids(2, 64, 96)
    assert ids.shape == (2, 24, 3) and ids.dtype == torch.float32
    assert torch.equal(ids[0, 7], torch.tensor([0.0, 1.0, 1.0]))  # row-major: token 7 = row 1, col 1
    assert torch.equal(ids[1, -1], torch.tensor([0.0, 3.0, 5.0]))
    assert torch.count_nonzero(sampling.txt_ids(2, 5)) == 0


def test_noise_is_seeded_on_cpu():
    a = sampling.get_noise(2, 64, 96, seed=7)
    assert a.shape == (2, 16, 8, 12)
    assert torch.equal(a, sampling.get_noise(2, 64, 96, seed=7))
    assert not torch.equal(a, sampling.get_noise(2, 64, 96, seed=8))
    expected = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, expected)


class _Velocity(torch.nn.Module):
    """pred = constant: Euler from t=1 to 0 must move img by exactly -constant."""

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        return torch.ones_like(img) * 2


def test_euler_loop_and_callback():
    img = torch.zeros(1, 4, 8)
    seen = []
    out = sampling.denoise(
        _Velocity(), img, None, None, None, None, [1.0, 0.6, 0.0], 3.5, callback=lambda s, n: seen.append((s, n))
    )
    torch.testing.assert_close(out, torch.full_like(img, -2.0))
    assert seen == [(1, 2), (2, 2)]
