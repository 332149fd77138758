import pytest
import torch
import torch.nn.functional as F

from server.degradation.resize import resize


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
@pytest.mark.parametrize("kw", [{"scale_factor": 0.6448}, {"scale_factor": 1.37}, {"scale_factor": 0.15},
                                {"size": (90, 90)}, {"size": (97, 45)}])
def test_matches_f_interpolate(mode, kw, device):
    x = torch.rand(3, 3, 120, 130, generator=torch.Generator().manual_seed(1)).to(device)
    ref = F.interpolate(x, mode=mode, **kw)
    out = resize(x, mode=mode, **kw)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_bilinear_does_not_depend_on_thread_count():
    x = torch.rand(4, 3, 360, 360, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(resize(x, scale_factor=0.6448, mode="bilinear"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_bad_arguments():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError):
        resize(x, mode="nearest", size=(4, 4))
    with pytest.raises(ValueError):
        resize(x, mode="bilinear")
