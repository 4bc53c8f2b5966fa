"""The compiled loss's gradients reach ``.grad`` as ``backward`` would put them:
handed over without a copy on a plain ``loss.backward()``, kept for a second
pass where the graph is retained, scaled by any other incoming gradient."""

import torch

from pyro_iwae.compiled.grads import PrecomputedGrad


def _loss_and_param():
    torch.manual_seed(0)
    p = torch.randn(4, 3, requires_grad=True)
    grad = torch.randn(4, 3)
    return p, grad, PrecomputedGrad.apply(torch.tensor(2.5), [grad, None], p, p)


def test_a_plain_backward_hands_the_gradient_over():
    p, grad, loss = _loss_and_param()
    expected, address = grad.clone(), grad.data_ptr()
    del grad  # the caller keeps no reference, as CompiledLoss keeps none
    assert loss.item() == 2.5
    loss.backward()
    assert torch.equal(p.grad, expected)
    assert p.grad.data_ptr() == address  # taken, not copied


def test_a_retained_graph_gives_the_gradient_again():
    p, grad, loss = _loss_and_param()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(p.grad, 2 * grad, rtol=0, atol=0)


def test_another_incoming_gradient_scales_it():
    p, grad, loss = _loss_and_param()
    (3.0 * loss).backward()
    torch.testing.assert_close(p.grad, 3.0 * grad)
    assert p.grad.data_ptr() != grad.data_ptr()
