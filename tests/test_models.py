import torch
from torch.nn import functional as F

from pipeline.models import MLP, DenseNet, dropout_masks


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_densenet40_has_the_paper_parameter_count():
    assert n_params(DenseNet(depth=40, growth_rate=12, init_maps=16, in_channels=3, num_classes=10)) == 1_019_722


def test_densenet_runs_on_8x8_digits_and_32x32_cifar():
    for size, channels in ((8, 1), (32, 3)):
        out = DenseNet(depth=10, growth_rate=4, init_maps=4, in_channels=channels).eval()(
            torch.randn(2, channels, size, size))
        assert out.shape == (2, 10)


def test_dropout_masks_are_a_function_of_the_generator_seed():
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.5, in_channels=1).train()
    x = torch.randn(4, 1, 8, 8)

    def forward(seed):
        with dropout_masks(model, torch.Generator().manual_seed(seed)):
            return model(x)

    assert torch.equal(forward(1), forward(1))
    assert not torch.equal(forward(1), forward(2))


def test_training_forward_without_masks_is_an_error():
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.5, in_channels=1).train()
    try:
        model(torch.randn(2, 1, 8, 8))
    except RuntimeError as exc:
        assert "dropout_masks" in str(exc)
    else:
        raise AssertionError("a training forward drew hidden random masks")


def test_mlp_sizes_and_scaled_form():
    plain = MLP()
    assert n_params(plain) == 784 * 50 + 50 + 2 * (50 * 50 + 50) + 50 * 10 + 10
    scaled = MLP(scaled=True)
    layer = scaled.layers[0]
    layer.s.fill_(0.5)
    assert torch.allclose(layer.weight, torch.exp(torch.tensor(0.5)) * layer.z)
    assert scaled(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert "layers.0.s" not in dict(scaled.named_parameters())  # s is a hyperparameter, not trained


def test_scaled_layer_is_the_linear_map_of_its_effective_weights():
    """forward scales the product x z^T by e^s instead of forming w = e^s * z: the same function,
    and the same first and second derivatives in z and s, to float64 rounding."""
    torch.manual_seed(0)
    layer = MLP((7, 5, 3), scaled=True, scaled_biases=True).to(torch.float64).layers[0]
    with torch.no_grad():
        layer.bias_z.normal_()
        layer.bias_s.normal_()
    x, u = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    s = layer.s = layer.s.normal_().clone().requires_grad_()  # a leaf to differentiate by

    def grads(forward):
        """d(u . tanh(forward))/d(z, s), and the derivatives of |d/dz|^2 (second order, as HVPs need)."""
        g = torch.autograd.grad((u * torch.tanh(forward(x))).sum(), [layer.z, s], create_graph=True)
        return (*g, *torch.autograd.grad(g[0].square().sum(), [layer.z, s]))

    reference = lambda x: F.linear(x, layer.weight, layer.bias_s.exp() * layer.bias_z)
    assert torch.allclose(layer(x), reference(x), rtol=1e-13, atol=0)
    for got, want in zip(grads(layer), grads(reference)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
