"""The model contract (models.py docstring), the CifarNets' unchanged numerics, and the CIFAR ResNets."""
import functools

import pytest
import torch
from torch import nn

from models import (MODELS, Bottleneck, CifarNet, PowerCifarNet, ResNet, ResNet18, SmallCifarNet, build_model,
                    count_macs, count_parameters)

GROUP_KEYS = ["filters", "norms", "head", "stem_bias"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of 2 to 4 images: a second thread gains little, and costs much when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def cached(name, num_classes):
    """Each model built once for the read-only tests (the ResNets take a fraction of a second each)."""
    torch.manual_seed(0)
    return build_model(name, num_classes=num_classes)


def ids(params):
    return [id(p) for p in params]


def old_trainer_groups(model):
    """The optimiser groups train.py built by parameter name before the contract (bit-exact resume needs these)."""
    named = dict(model.named_parameters())
    return {"filters": [p for p in named.values() if p.ndim == 4 and p.requires_grad],
            "norms": [p for n, p in named.items() if "norm" in n and p.requires_grad],
            "head": [named["head.weight"]],
            "stem_bias": [named["whiten.bias"]]}


def old_whitening_weights(images, eps=5e-4):
    """The former CifarNet.init_whitening's formula, written out."""
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2).float()
    flat = patches.reshape(len(patches), -1)
    flat = flat - flat.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat))
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, 2, 2)
    return torch.cat((filters, -filters))


@pytest.fixture(scope="module", params=[(name, n) for name in MODELS for n in (10, 100)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def built(request):
    name, num_classes = request.param
    return cached(name, num_classes), num_classes


def test_output_shape(built):
    model, num_classes = built
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_parameter_groups_partition_the_trainable_parameters(built):
    model, _ = built
    groups = model.parameter_groups()
    assert list(groups) == GROUP_KEYS
    grouped = [id(p) for params in groups.values() for p in params]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == set(trainable), "groups must hold every trainable parameter and no frozen one"
    assert all(p.ndim == 4 for p in groups["filters"])
    assert all(p.ndim == 1 for p in groups["norms"])
    assert groups["filters"] and groups["norms"] and groups["head"]


def test_contract_attributes(built):
    model, _ = built
    assert isinstance(model.DATA_INIT_IMAGES, int) and model.DATA_INIT_IMAGES >= 0
    assert callable(model.init_from_data)


def test_contract_values():
    assert SmallCifarNet.RECIPE == PowerCifarNet.RECIPE == "muon"
    assert SmallCifarNet.DATA_INIT_IMAGES == PowerCifarNet.DATA_INIT_IMAGES == 5000
    for name in ("ResNet18", "ResNet34", "ResNet50"):
        assert MODELS[name].RECIPE == "sgd" and MODELS[name].DATA_INIT_IMAGES == 0
        assert issubclass(MODELS[name], ResNet)


@pytest.mark.parametrize("make", [SmallCifarNet, lambda: PowerCifarNet(1.0), lambda: PowerCifarNet(0.5),
                                  lambda: PowerCifarNet(width_mult=1.5, num_classes=100)],
                         ids=["small", "power1.0", "power0.5", "power1.5-100"])
def test_cifarnet_groups_are_the_old_trainer_groups(make):
    model = make()
    new, old = model.parameter_groups(), old_trainer_groups(model)
    for key in GROUP_KEYS:
        assert ids(new[key]) == ids(old[key]), key  # the same tensors in the same order
    assert new["stem_bias"] == [model.whiten.bias] and new["head"] == [model.head.weight]


def test_init_from_data_is_the_old_whitening():
    images = torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.3 + 0.2
    for model in (SmallCifarNet(), PowerCifarNet(1.0)):
        others = {n: t.clone() for n, t in model.state_dict().items() if n != "whiten.weight"}
        model.init_from_data(images)
        assert torch.equal(model.whiten.weight, old_whitening_weights(images))  # bit-identical
        assert all(torch.equal(t, others[n]) for n, t in model.state_dict().items() if n != "whiten.weight")
        assert not model.whiten.weight.requires_grad


def test_cifarnet_names_and_defaults_unchanged():
    model = PowerCifarNet()
    assert model.width_mult == 1.0 and model.widths == (64, 256, 256) and model.head.out_features == 10
    assert SmallCifarNet().widths == (32, 128, 128)
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["whiten.weight", "whiten.bias", "layers.0.conv1.weight"] and names[-1] == "head.weight"
    assert isinstance(build_model("PowerCifarNet", width_mult=0.5), CifarNet)


def test_resnet_init_from_data_is_a_no_op():
    model = ResNet18()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    model.init_from_data(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("name, expected", [("ResNet18", 11.17e6), ("ResNet34", 21.28e6), ("ResNet50", 23.52e6)])
def test_resnet_parameter_counts(name, expected):
    model = cached(name, 10)
    assert count_parameters(model) == pytest.approx(expected, rel=0.01)
    groups = model.parameter_groups()
    assert ids(groups["head"]) == ids([model.fc.weight, model.fc.bias]) and groups["stem_bias"] == []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert ids(groups["filters"]) == ids(m.weight for m in convs)
    assert ids(groups["norms"]) == ids(p for m in norms for p in (m.weight, m.bias))
    assert all(m.bias is None for m in convs)


def test_resnet_form():
    model = cached("ResNet18", 10)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1) and model.stem[0].out_channels == 64
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # Stage outputs: 64 channels at 32x32, then 128/256/512 at 16/8/4.
    model.eval()
    with torch.no_grad():
        shapes, x = [], model.stem(torch.randn(1, 3, 32, 32))
        for stage in model.layers:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert cached("ResNet50", 10).fc.in_features == 2048


def test_count_macs():
    assert count_macs(cached("ResNet18", 10)) == pytest.approx(0.556e9, rel=0.02)
    small = SmallCifarNet()
    # All layers are convs on maps whose area scales with the image, except the head.
    assert count_macs(small, image_size=64) > 3.9 * count_macs(small, image_size=32)


# ResNet34/50 take several seconds a step on 2 busy cores; ResNet18 and a one-block-per-stage Bottleneck ResNet
# cover both block kinds.
@pytest.mark.parametrize("make", [ResNet18, lambda: ResNet(Bottleneck, (1, 1, 1, 1))], ids=["ResNet18", "Bottleneck"])
def test_one_sgd_step_moves_every_parameter(make):
    torch.manual_seed(0)
    model = make()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
    loss.backward()
    optimizer.step()
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unmoved, f"no gradient reached {unmoved}"
