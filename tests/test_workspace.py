import pytest
import torch

from newllm_nb.kernels import workspace
from newllm_nb.kernels.linear import _onednn_linear, _torch_op, backward_weights, linear, transposed, transposed_product


def test_a_kept_buffer_is_handed_out_again_only_once_nothing_refers_to_it():
    workspace.release()
    cpu = torch.device("cpu")
    a = workspace.empty("t", (4, 8), torch.float32, cpu)
    ptr = a.data_ptr()
    del a
    b = workspace.empty("t", (2, 8), torch.float32, cpu)  # smaller fits the kept buffer
    assert b.data_ptr() == ptr and b.shape == (2, 8)
    view = b[1]
    del b
    c = workspace.empty("t", (4, 8), torch.float32, cpu)  # a view of the last one is alive: a new buffer
    assert c.data_ptr() != ptr
    del view, c
    assert workspace.empty("t", (4, 8), torch.float32, cpu).data_ptr() != ptr  # the old one was dropped
    assert workspace.empty("t", (4, 8), torch.int64, cpu).dtype == torch.int64  # kept per dtype
    assert workspace.empty("t", (64, 8), torch.float32, cpu).shape == (64, 8)  # larger: a new buffer


def test_a_buffer_saved_for_a_backward_pass_is_not_handed_out():
    workspace.release()
    cpu = torch.device("cpu")

    class Saves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            buf = workspace.empty("saved", x.shape, x.dtype, x.device).copy_(x)
            ctx.save_for_backward(buf)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            (buf,) = ctx.saved_tensors
            return g * buf

    x = torch.randn(6, requires_grad=True)
    y = Saves.apply(x)
    workspace.empty("saved", (6,), torch.float32, cpu).fill_(123.0)  # must not overwrite the saved one
    y.sum().backward()
    torch.testing.assert_close(x.grad, x.detach())


def test_off_cpu_every_call_is_a_new_tensor():
    meta = torch.device("meta")
    assert workspace.empty("m", (3,), torch.float32, meta).device.type == "meta"
    assert workspace._buffers().get(("m", torch.float32)) is None


def test_transposed_copies_and_the_onednn_linear_backward_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    assert torch.equal(transposed("x", x), x.t().contiguous())
    a, w, b = torch.randn(2, 5, 7, requires_grad=True), torch.randn(4, 7, requires_grad=True), torch.randn(4)
    b.requires_grad_()
    got = torch.autograd.grad(linear(a, w, b).square().sum(), (a, w, b))
    want = torch.autograd.grad(torch.nn.functional.linear(a, w, b).square().sum(), (a, w, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_both_ways_to_a_weight_gradient_give_dy_t_x():
    torch.manual_seed(0)
    dy, x = torch.randn(40, 6), torch.randn(40, 9)
    op, bw = _onednn_linear(), _torch_op("aten", "mkldnn_linear_backward_weights")
    if op is None or bw is None:
        pytest.skip("this torch build has no oneDNN")
    torch.testing.assert_close(transposed_product(op, dy, x), dy.t() @ x)
    torch.testing.assert_close(backward_weights(bw, dy, x), dy.t() @ x)
    torch.testing.assert_close(backward_weights(bw, dy[:, :4].t().contiguous().t(), x), dy[:, :4].t() @ x)
