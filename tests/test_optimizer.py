"""The optimiser: Muon for conv filters, SGD with per-example rates for the rest, linear decay; and the
ResNets' recipe, SGD with warm-up and cosine decay."""
import pytest
import torch
import torch.nn.functional as F

import train
from models import BasicBlock, ResNet, SmallCifarNet

PLAN = {"recipe": "muon", "lr": train.MUON_LR, "weight_decay": train.WEIGHT_DECAY_PER_EXAMPLE, "batch_size": 64,
        "epochs": 4}


def test_orthogonalize_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    for rows in (32, 128):
        gradient = torch.randn(rows, 288) * torch.logspace(-1, 0, 288)
        before = torch.linalg.svdvals(gradient)
        assert before.max() / before.min() > 2.5  # (condition numbers 2.6 and 10.5)
        singular_values = torch.linalg.svdvals(train.orthogonalize(gradient))
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5


def test_a_step_moves_each_filter_bank_by_an_orthogonalised_update_at_fixed_norm():
    torch.manual_seed(0)
    model = SmallCifarNet()
    optimizer = train.make_optimizer(model, PLAN)
    train.set_learning_rates(optimizer, PLAN, examples=PLAN["batch_size"], step=0, steps_per_epoch=10)
    filters = optimizer.param_groups[0]
    assert filters["name"] == "filters" and len(filters["params"]) == 6  # the six 3x3 convs, not the frozen stem
    before = [p.detach().clone() for p in filters["params"]]
    F.cross_entropy(model(torch.randn(64, 3, 32, 32)), torch.randint(0, 10, (64,))).backward()
    optimizer.step()
    for old, new in zip(before, filters["params"]):
        renormalised = old * len(old) ** 0.5 / old.norm()
        update = (renormalised - new.detach()) / filters["lr"]
        singular_values = torch.linalg.svdvals(update.reshape(len(update), -1))
        # Raw gradients are dominated by a few directions; the update spreads over all of them.
        assert singular_values.max() < 1.5 and singular_values.median() > 0.5


def test_rates_decay_linearly_and_sgd_rates_are_per_example():
    optimizer = train.make_optimizer(SmallCifarNet(), PLAN)
    rates = {}
    for step in (0, 15, 40):
        train.set_learning_rates(optimizer, PLAN, examples=PLAN["batch_size"], step=step, steps_per_epoch=10)
        rates[step] = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates[0]["filters"] == pytest.approx(train.MUON_LR)
    assert rates[0]["head"] == pytest.approx(train.HEAD_LR_PER_EXAMPLE * 64)
    assert rates[15]["norms"] == pytest.approx(train.BIAS_LR_PER_EXAMPLE * 64 * (1 - 15 / 40))
    # The whitening bias decays over its own few epochs and then stays at zero.
    assert rates[15]["stem_bias"] == pytest.approx(train.BIAS_LR_PER_EXAMPLE * 64 * (1 - 15 / 30))
    assert rates[40]["stem_bias"] == 0 and rates[40]["filters"] == 0
    # --lr scales every rate together.
    train.set_learning_rates(optimizer, dict(PLAN, lr=train.MUON_LR / 2), examples=PLAN["batch_size"], step=0,
                             steps_per_epoch=10)
    assert optimizer.param_groups[2]["lr"] == pytest.approx(train.HEAD_LR_PER_EXAMPLE * 64 / 2)


def test_the_sgd_recipe_warms_up_then_follows_a_cosine_to_zero():
    plan = dict(PLAN, recipe="sgd", lr=0.2, weight_decay=5e-4, epochs=10)
    model = ResNet(BasicBlock, (1, 1, 1, 1))
    optimizer = train.make_optimizer(model, plan)
    assert [g["name"] for g in optimizer.param_groups] == ["all"]
    assert len(optimizer.param_groups[0]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    rates = []
    for step in range(100):  # 10 epochs of 10 steps: 10 warm-up steps
        train.set_learning_rates(optimizer, plan, examples=64, step=step, steps_per_epoch=10)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.02) and rates[9] == pytest.approx(0.2)  # linear warm-up to the peak
    assert rates[10] == pytest.approx(0.2) and rates[55] == pytest.approx(0.1)  # the cosine's middle: half
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[99] < 0.001


def test_a_selective_backprop_step_backpropagates_only_the_hardest_examples():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    inputs, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    with torch.no_grad():
        before = model(inputs)
    hardest = F.cross_entropy(before, labels, reduction="none").topk(4).indices

    def gradients(chosen):
        model.zero_grad()
        F.cross_entropy(model(inputs[chosen]), labels[chosen], label_smoothing=train.LABEL_SMOOTHING).backward()
        return [p.grad.clone() for p in model.parameters()]

    expected, whole_batch = gradients(hardest), gradients(torch.arange(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights, and so the gradients
    outputs, loss = train.training_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), inputs, labels,
                                       None, backprop_fraction=0.5)
    for parameter, hardest_gradient, whole_gradient in zip(model.parameters(), expected, whole_batch):
        assert torch.allclose(parameter.grad, hardest_gradient)
        assert not torch.allclose(parameter.grad, whole_gradient)
    # What the step reports is the whole batch's, from before it, as a plain step's is.
    assert torch.equal(outputs, before)
    assert loss == pytest.approx(F.cross_entropy(before, labels, label_smoothing=train.LABEL_SMOOTHING).item())
    assert train.backpropagated(1000, 0.5) == 500 and train.backpropagated(3, 0.1) == 1
    assert train.backpropagated(100, 0.5, ranks=4) == 48  # each of 4 ranks keeps round(12.5) of its 25
