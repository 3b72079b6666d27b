"""The torchvision classification zoo: 30 % of the channels removed at a small input size; every model
runs forward with the right output shape, fewer MACs and fewer parameters (weights=None: no download)."""
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from pruning.channels import prune_channels  # noqa: E402
from test_prune_weights import one_thread  # noqa: E402,F401


# the suite shares a 2-core machine: intra-op threads only add contention at these tiny sizes
pytestmark = pytest.mark.usefixtures("one_thread")

# smallest variant of every family; (constructor kwargs, input side)
ZOO = {
    "resnet18": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64),
    "vgg11_bn": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "convnext_tiny": ({}, 64),
    "mnasnet0_5": ({}, 64),
    "swin_t": ({}, 64),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_zoo(name):
    kwargs, side = ZOO[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, side, side)
    pruned, report = prune_channels(model, x, ratio=0.3, return_report=True, progress=False)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()
    assert report.macs_after < report.macs_before, report.summary()
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    # a typical CNN loses about half its MACs at 30 % channels (0.7^2); Swin keeps its attention channels
    assert report.mac_reduction > (1.05 if name == "swin_t" else 1.3), report.summary()


@pytest.mark.slow
def test_vision_transformer_mlp_pruned_attention_kept():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
    assert pruned(x).shape == (2, 10)
    assert pruned.encoder.layers[0].mlp[0].out_features == 32
    assert pruned.encoder.layers[0].self_attention.embed_dim == 32  # the residual width is kept
    assert pruned.encoder.layers[0].self_attention.num_heads == 2  # half of the 4 heads
    assert any("MultiheadAttention" in k for k in report.kept)
