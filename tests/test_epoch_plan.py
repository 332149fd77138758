from collections import Counter

import pytest

from server.degradation.config import DegradationConfig
from server.degradation.epoch_plan import make_epoch_plan
from server.degradation.images import ImageInfo

IMAGES = [ImageInfo("b.png", 1000, 800), ImageInfo("a.png", 720, 360), ImageInfo("c.png", 361, 1500)]
CFG = DegradationConfig()


def expected_count(images, p=360):
    return sum((i.width // p) * (i.height // p) for i in images)


@pytest.mark.parametrize("epoch", range(6))
def test_plan_covers_every_patch_exactly_once_without_overlap(epoch):
    plan = make_epoch_plan(IMAGES, CFG, seed=3, epoch=epoch)
    assert plan.num_patches == expected_count(IMAGES)
    assert len(set(plan.patches)) == plan.num_patches
    flat = [p for k in range(plan.num_batches) for p in plan.batch(k)]
    assert flat == list(plan.patches)  # batches partition the plan, in order
    sizes = {i.name: (i.width, i.height) for i in IMAGES}
    by_image = {}
    for p in plan.patches:
        w, h = sizes[p.image]
        assert 0 <= p.x and p.x + 360 <= w and 0 <= p.y and p.y + 360 <= h
        by_image.setdefault(p.image, []).append(p)
    for name, ps in by_image.items():
        # one grid per image: same offset modulo 360, non-overlapping, row-major order
        assert len({p.x % 360 for p in ps}) == 1 and len({p.y % 360 for p in ps}) == 1
        assert [(p.y, p.x) for p in ps] == sorted((p.y, p.x) for p in ps)
        w, h = sizes[name]
        assert all(p.x % 360 <= w % 360 and p.y % 360 <= h % 360 for p in ps)


def test_images_in_sorted_name_order():
    plan = make_epoch_plan(IMAGES, CFG, seed=0, epoch=0)
    order = [p.image for p in plan.patches]
    assert order == sorted(order)


def test_batch_sizes_first_random_rest_full():
    imgs = [ImageInfo(f"{i:03d}.png", 360 * 10, 360 * 10) for i in range(5)]  # 500 patches
    firsts = []
    for epoch in range(60):
        plan = make_epoch_plan(imgs, CFG, seed=1, epoch=epoch)
        sizes = [plan.batch_starts[k + 1] - plan.batch_starts[k] for k in range(plan.num_batches)]
        firsts.append(sizes[0])
        assert 32 <= sizes[0] <= 128
        assert all(s == 128 for s in sizes[1:-1]) and 1 <= sizes[-1] <= 128
        assert sum(sizes) == 500
    assert len(set(firsts)) > 20  # the first batch size really moves between epochs


def test_offsets_move_between_epochs_and_are_deterministic():
    a = [next(p for p in make_epoch_plan(IMAGES, CFG, seed=5, epoch=e).patches if p.image == "b.png")
         for e in range(20)]
    assert len({(p.x, p.y) for p in a}) > 5
    assert make_epoch_plan(IMAGES, CFG, 5, 2) == make_epoch_plan(IMAGES, CFG, 5, 2)
    assert make_epoch_plan(IMAGES, CFG, 5, 2) != make_epoch_plan(IMAGES, CFG, 6, 2)


def test_offset_range_is_full():
    img = [ImageInfo("x.png", 360 + 3, 360 + 2)]
    seen = Counter((p.x, p.y) for e in range(400) for p in make_epoch_plan(img, CFG, 0, e).patches)
    assert set(seen) == {(x, y) for x in range(4) for y in range(3)}


def test_vcisr_code_first_batch_range():
    cfg = DegradationConfig.for_profile("vcisr-code")
    imgs = [ImageInfo("big.png", 360 * 20, 360 * 20)]
    firsts = {make_epoch_plan(imgs, cfg, 0, e).batch_starts[1] for e in range(300)}
    assert max(firsts) <= 127 and min(firsts) >= 32


def test_batch_index_errors():
    plan = make_epoch_plan(IMAGES, CFG, 0, 0)
    with pytest.raises(IndexError):
        plan.batch(plan.num_batches)
    with pytest.raises(ValueError):
        make_epoch_plan(IMAGES, CFG, -1, 0)
