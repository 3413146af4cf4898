"""modules/accumulate.py: the gradient of a minibatch's loss over micro-batches equals one pass's (through the RL
module, for every objective: tests/test_microbatch.py)."""
import pytest
import torch

from modules.accumulate import accumulate
from modules.batch import ObjectiveOutput


def _setup(dropout: float):
    """A toy "policy": 6 rows of 4 features through a linear layer (and dropout), one number per row."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 1), torch.randn(6, 4)
    drop = torch.nn.Dropout(dropout)
    return layer, lambda rows: (drop(layer(x[rows])).squeeze(-1), None)


def whitened(y: torch.Tensor, _values=None) -> ObjectiveOutput:
    """Not separable: every row's term reads the mean and std of all rows."""
    loss = (((y - y.mean()) / y.std()) * torch.arange(6.0)).sum()
    return ObjectiveOutput(loss, {"mean": y.mean().detach()})


def per_row(y: torch.Tensor, _values=None) -> ObjectiveOutput:
    """Separable: each row's own term over a constant (the count)."""
    loss = (y.pow(2) * torch.arange(6.0)).sum() / 6
    return ObjectiveOutput(loss, {"mean": y.mean().detach()})


@pytest.mark.parametrize("loss, separable, reuse, dropout, parts", [
    (whitened, False, False, 0.0, [[0, 1], [2, 3, 4], [5]]), (whitened, False, True, 0.0, [[0, 1], [2, 3, 4], [5]]),
    (whitened, False, False, 0.5, [[0, 1], [2, 3, 4], [5]]), (whitened, False, False, 0.0, [[4, 0], [5, 2], [1, 3]]),
    (per_row, True, False, 0.0, [[0, 1], [2, 3, 4], [5]]), (per_row, True, False, 0.0, [[4, 0], [5, 2], [1, 3]]),
    (per_row, False, False, 0.0, [[0, 1], [2, 3, 4], [5]])])
def test_micro_batches_give_the_gradient_loss_and_metrics_of_one_pass(loss, separable, reuse, dropout, parts):
    """Micro-batches of rows (in order, or not): the parameters' gradient, the loss and its metrics equal one pass
    over all 6 rows within float rounding (with dropout: the pass that draws the micro-batches' masks in turn; the
    replayed random state gives the backward's forwards the same masks). With `reuse`, the first pass is skipped
    and `initial` (what that pass gives: no step since) stands for it."""
    layer, forward = _setup(dropout)
    parts = [torch.tensor(rows) for rows in parts]
    torch.manual_seed(1)
    drawn = [forward(rows)[0] for rows in parts]
    whole = loss(torch.zeros(6).index_put((torch.cat(parts),), torch.cat(drawn)))
    whole.loss.backward()
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with torch.no_grad():
        initial = forward(torch.arange(6))
    torch.manual_seed(1)
    out = accumulate(parts, forward, loss, lambda t: t.backward(), initial, separable, reuse)
    assert torch.allclose(out.loss, whole.loss.detach(), atol=1e-6)
    assert torch.allclose(out.metrics["mean"], whole.metrics["mean"], atol=1e-6)
    for got, want in zip((p.grad for p in layer.parameters()), expected):
        assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_a_loss_that_is_not_separable_is_wrong_on_the_one_forward_path():
    """Why `separable` must be declared: the whitened loss through the one-forward path is not one pass's gradient
    (the other rows hold pi_old-like values while the statistics need the current ones). A test that could fail."""
    layer, forward = _setup(0.0)
    whitened(*forward(torch.arange(6))).loss.backward()
    expected = layer.weight.grad.clone()
    layer.zero_grad()
    with torch.no_grad():
        stale = (forward(torch.arange(6))[0] + 1.0, None)          # other rows not yet at their current value
    parts = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5])]
    accumulate(parts, forward, whitened, lambda t: t.backward(), stale, separable=True)
    assert not torch.allclose(layer.weight.grad, expected, atol=1e-3)
