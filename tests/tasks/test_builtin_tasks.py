"""Every built-in task: data shapes and types, split hygiene, determinism, and a trainable model."""

from collections import Counter

import pytest
import torch

from largebatch.tasks import get_task

# Small versions of every built-in task, so the whole matrix runs in seconds.
SMALL = {
    "mnist1d-cnn": {"num_samples": 600},
    "mnist1d-mlp": {"num_samples": 600},
    "digits-cnn": {},
    "teacher-student": {"num_train": 600, "num_test": 200},
    "logreg": {"num_train": 600, "num_test": 200, "num_features": 300},
    "modadd-transformer": {"modulus": 23, "d_model": 32, "n_heads": 2},
}
# name -> (input shape per example, input dtype, number of classes)
EXPECTED = {
    "mnist1d-cnn": ((40,), torch.float32, 10),
    "mnist1d-mlp": ((40,), torch.float32, 10),
    "digits-cnn": ((1, 8, 8), torch.float32, 10),
    "teacher-student": ((20,), torch.float32, 10),
    "logreg": ((300,), torch.float32, 2),
    "modadd-transformer": ((3,), torch.int64, 23),
}


def rows(dataset) -> Counter:
    """Multiset of (input, target) rows, hashable, for set algebra on splits."""
    inputs, targets = dataset.tensors
    return Counter(
        (x.numpy().tobytes(), int(y)) for x, y in zip(inputs.flatten(1), targets, strict=True)
    )


@pytest.fixture(scope="module", params=sorted(SMALL))
def built(request):
    name = request.param
    return name, get_task(name, **SMALL[name])


def test_shapes_dtypes_and_classes(built):
    name, task = built
    shape, dtype, num_classes = EXPECTED[name]
    for split in (task.train, task.val, task.test):
        inputs, targets = split.tensors
        assert tuple(inputs.shape[1:]) == shape
        assert inputs.dtype == dtype
        assert targets.dtype == torch.int64
        assert int(targets.min()) >= 0 and int(targets.max()) < num_classes
        assert torch.isfinite(inputs.float()).all()
    assert len(torch.unique(task.train.tensors[1])) == num_classes
    assert task.target_metric[0] in task.metrics
    assert 0 < task.target_metric[1] <= 1


def test_splits_are_disjoint(built):
    _, task = built
    train, val, test = rows(task.train), rows(task.val), rows(task.test)
    assert not train.keys() & val.keys()
    assert not train.keys() & test.keys()
    assert not val.keys() & test.keys()


def test_val_is_carved_from_train_not_test(built):
    name, task = built
    whole_train = get_task(name, **SMALL[name], val_fraction=0.0)
    assert whole_train.val is None
    assert rows(task.train) + rows(task.val) == rows(whole_train.train)
    assert rows(task.test) == rows(whole_train.test)
    assert len(task.val) == round(0.1 * len(whole_train.train))


def test_same_seed_same_data_other_seed_other_data(built):
    name, task = built
    again = get_task(name, **SMALL[name])
    other = get_task(name, **SMALL[name], seed=7)
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(task, split).tensors, getattr(again, split).tensors):
            assert torch.equal(a, b)
    assert rows(task.train) != rows(other.train)


def test_model_output_and_loss_decrease(built):
    """A freshly built model maps a batch to class logits; a few Adam steps lower the loss."""
    name, task = built
    num_classes = EXPECTED[name][2]
    torch.manual_seed(0)
    model = task.build_model()
    inputs, targets = (t[:128] for t in task.train.tensors)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        output = model(inputs)
        loss = task.loss_fn(output, targets)
        assert output.shape == (128, num_classes)
        assert loss.ndim == 0 and torch.isfinite(loss)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0]
    per_example = task.metrics["accuracy"](model(inputs), targets)
    assert per_example.shape == (128,)


def test_model_initialisation_follows_the_global_seed(built):
    _, task = built
    torch.manual_seed(1)
    first = torch.nn.utils.parameters_to_vector(task.build_model().parameters())
    torch.manual_seed(1)
    second = torch.nn.utils.parameters_to_vector(task.build_model().parameters())
    torch.manual_seed(2)
    third = torch.nn.utils.parameters_to_vector(task.build_model().parameters())
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
