import pytest
import torch

from maskdit import random_mask
from maskdit.masking import mask_from_ids_keep, num_kept


@pytest.mark.parametrize("L,ratio", [(64, 0.5), (256, 0.5), (49, 0.3), (16, 0.75), (10, 0.0), (1024, 0.9)])
def test_random_mask_properties(L, ratio):
    n = 5
    mk = random_mask(n, L, ratio, generator=torch.Generator().manual_seed(0))
    k = int(L * (1 - ratio))
    assert mk.ids_keep.shape == (n, k) and mk.ids_keep.dtype == torch.int64
    assert mk.ids_restore.shape == (n, L) and mk.mask.shape == (n, L) and mk.mask.dtype == torch.bool
    for i in range(n):
        assert len(set(mk.ids_keep[i].tolist())) == k  # unique
    # ids_restore is the inverse permutation of the shuffle (whose first K entries are ids_keep)
    shuffle = mk.ids_restore.argsort(dim=1)
    assert torch.equal(shuffle[:, :k], mk.ids_keep)
    assert torch.equal(torch.gather(shuffle, 1, mk.ids_restore), torch.arange(L).expand(n, L))
    assert torch.equal(mk.mask.sum(1), torch.full((n,), L - k))
    assert torch.equal(mk.mask, mask_from_ids_keep(mk.ids_keep, L))


def test_num_kept_matches_official_rounding():
    assert num_kept(256, 0.5) == 128 and num_kept(1024, 0.5) == 512
    assert num_kept(64, 0.3) == int(64 * 0.7) == 44


def test_random_mask_is_seeded_and_varies_per_sample():
    a = random_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(7))
    b = random_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.ids_keep[0].sort().values, a.ids_keep[1].sort().values)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 16, ratio)


def test_ratio_keeping_nothing():
    with pytest.raises(ValueError, match="keeps no token"):
        random_mask(2, 4, 0.9)
