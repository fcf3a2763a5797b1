"""The paper's anchor backbones: shapes, strides, parameter counts, pretrained loading, routing."""

import pytest
import torch
import torchvision
from torch import nn

from dymu.anchor import AnchorNet, count_parameters
from dymu.backbones import DeepLabMobileNetV2, DeepLabResNet34, ResNet9, build_backbone
from dymu.search_space import Architecture
from dymu.tasks import make_task

# (channels, stride) of every block's output
MOBILENET_BLOCKS = ([(16, 2)] + [(24, 4)] * 2 + [(32, 8)] * 3 + [(64, 16)] * 4 + [(96, 16)] * 3 + [(160, 16)] * 3
                    + [(320, 16), (128, 16)])
RESNET34_BLOCKS = [(64, 4)] * 3 + [(128, 8)] * 4 + [(256, 16)] * 6 + [(512, 16)] * 3 + [(256, 16)]
RESNET9_BLOCKS = [(64, 1), (128, 2), (256, 4), (512, 8)]


def randomize_batchnorm(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so that eval-mode comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return module


def conv_bn_params(k, c_in, c_out):
    """A k x k conv without bias and its BatchNorm (weight and bias)."""
    return k * k * c_in * c_out + 2 * c_out


def run_blocks(blocks, x):
    outputs = [x]
    with torch.no_grad():
        for block in blocks:
            outputs.append(block(outputs[-1]))
    return outputs


@pytest.mark.parametrize("backbone, size, expected", [
    (DeepLabMobileNetV2(), 64, MOBILENET_BLOCKS),
    (DeepLabResNet34(), 64, RESNET34_BLOCKS),
    (ResNet9(), 32, RESNET9_BLOCKS),
])
def test_blocks_and_head_shapes(backbone, size, expected):
    torch.manual_seed(0)
    blocks = [b.eval() for b in backbone.make_blocks()]
    assert len(blocks) == backbone.num_blocks == len(expected)
    path = run_blocks(blocks, torch.randn(2, 3, size, size))
    assert [(y.shape[1], size // y.shape[-1]) for y in path[1:]] == expected
    assert all(y.shape[-2] == y.shape[-1] for y in path)
    head = backbone.make_head(make_task("semseg", out_channels=7)).eval()
    with torch.no_grad():
        out = head(path)
    assert out.shape == ((2, 7) if isinstance(backbone, ResNet9) else (2, 7, size, size))


def test_dense_heads_use_the_stride_4_feature_of_block_2():
    for backbone, low_channels in [(DeepLabMobileNetV2(), 24), (DeepLabResNet34(), 64)]:
        head = backbone.make_head(make_task("depth"))
        assert head.low_index == 2 and head.project_low[0].in_channels == low_channels
        assert head.project_low[0].out_channels == 48


def test_dilation_follows_deeplab_output_stride_16():
    mobilenet = DeepLabMobileNetV2().make_blocks()
    depthwise = [b.conv[1][0] for b in mobilenet[13:17]]  # features[14..17]
    assert [(c.stride, c.dilation, c.padding) for c in depthwise] == [((1, 1), (1, 1), (1, 1))] + [
        ((1, 1), (2, 2), (2, 2))] * 3
    resnet = DeepLabResNet34().make_blocks()
    first, *rest = resnet[13:16]  # layer4
    assert first.conv1.stride == first.downsample[0].stride == (1, 1) and first.conv2.dilation == (1, 1)
    for block in rest:
        assert block.conv1.dilation == block.conv2.dilation == block.conv1.padding == (2, 2)


def test_mobilenet_parameter_counts():
    backbone = DeepLabMobileNetV2()
    blocks = backbone.make_blocks()
    features = torchvision.models.mobilenet_v2(weights=None).features
    assert sum(count_parameters(b) for b in blocks[:17]) == count_parameters(features[:18])
    # R-ASPP: 1x1 branch and pooling branch 320 -> 128, projection 256 -> 128
    assert count_parameters(blocks[17]) == 2 * conv_bn_params(1, 320, 128) + conv_bn_params(1, 256, 128)
    # decoder: low 24 -> 48; separable 3x3 on 128 + 48 = 176 -> 128 (depthwise: 9 weights + BN per channel);
    # separable 3x3 128 -> 128; logits 128 -> 21 with bias
    decoder = (conv_bn_params(1, 24, 48) + 9 * 176 + 2 * 176 + conv_bn_params(1, 176, 128) + 9 * 128 + 2 * 128
               + conv_bn_params(1, 128, 128) + 128 * 21 + 21)
    assert count_parameters(backbone.make_head(make_task("semseg", out_channels=21))) == decoder


def test_resnet34_parameter_counts():
    backbone = DeepLabResNet34()
    blocks = backbone.make_blocks()
    resnet = torchvision.models.resnet34(weights=None)
    assert sum(count_parameters(b) for b in blocks[:16]) == count_parameters(resnet) - count_parameters(resnet.fc)
    # ASPP: 1x1, three 3x3 atrous, pooling 1x1 (512 -> 256 each), projection 5 * 256 -> 256
    aspp = 2 * conv_bn_params(1, 512, 256) + 3 * conv_bn_params(3, 512, 256) + conv_bn_params(1, 1280, 256)
    assert count_parameters(blocks[16]) == aspp
    decoder = (conv_bn_params(1, 64, 48) + conv_bn_params(3, 256 + 48, 256) + conv_bn_params(3, 256, 256)
               + 256 * 40 + 40)
    assert count_parameters(backbone.make_head(make_task("semseg", out_channels=40))) == decoder
    # the MobileNetV2 head on ResNet-34: R-ASPP 512 -> 128, separable decoder of 128 channels
    light = DeepLabResNet34(aspp_channels=128, aspp_rates=(), separable_decoder=True)
    assert count_parameters(light.make_blocks()[16]) == 2 * conv_bn_params(1, 512, 128) + conv_bn_params(1, 256, 128)
    decoder = (conv_bn_params(1, 64, 48) + 9 * 176 + 2 * 176 + conv_bn_params(1, 176, 128) + 9 * 128 + 2 * 128
               + conv_bn_params(1, 128, 128) + 128 * 40 + 40)
    assert count_parameters(light.make_head(make_task("semseg", out_channels=40))) == decoder


@pytest.mark.parametrize("width, channels", [(1.0, (64, 128, 256, 512)), (0.5, (32, 64, 128, 256)),
                                            (0.525, (34, 67, 134, 269))])
def test_resnet9_parameter_counts(width, channels):
    c0, c1, c2, c3 = channels
    blocks = [conv_bn_params(3, 3, c0),
              conv_bn_params(3, c0, c1) + 2 * conv_bn_params(3, c1, c1),
              conv_bn_params(3, c1, c2),
              conv_bn_params(3, c2, c3) + 2 * conv_bn_params(3, c3, c3)]
    backbone = ResNet9(width=width)
    assert [count_parameters(b) for b in backbone.make_blocks()] == blocks
    assert count_parameters(backbone.make_head(make_task("classification", out_channels=5))) == c3 * 5 + 5
    if width == 1.0:
        assert sum(blocks) + c3 * 5 + 5 == 6_570_565
    if width == 0.525:  # 20 streams: DYMU table 4's 36.18M to 0.25 %
        assert 20 * (sum(blocks) + c3 * 5 + 5) == 36_272_760


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    torch.manual_seed(1)
    net = randomize_batchnorm(torchvision.models.mobilenet_v2(weights=None), seed=1)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_mobilenet_pretrained_weights_and_features(mobilenet_file):
    path, net = mobilenet_file
    blocks = [b.eval() for b in DeepLabMobileNetV2(pretrained=str(path)).make_blocks()]
    torch.testing.assert_close(blocks[0][0][0].weight, net.features[0][0].weight, rtol=0, atol=0)
    torch.testing.assert_close(blocks[16].conv[2].weight, net.features[17].conv[2].weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    path_out = run_blocks(blocks, x)
    with torch.no_grad():
        reference = net.features[:14](x)  # blocks 0..12; features[14] onwards lose the stride
        torch.testing.assert_close(path_out[13], reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(path_out[3], net.features[:4](x), rtol=1e-4, atol=1e-4)
    # a second stream gets the same weights; the R-ASPP stays random
    again = DeepLabMobileNetV2(pretrained=str(path)).make_blocks()
    torch.testing.assert_close(again[5].conv[0][0].weight, blocks[5].conv[0][0].weight, rtol=0, atol=0)
    assert not torch.equal(again[17].project[0][0].weight, blocks[17].project[0][0].weight)


def test_pretrained_accepts_checkpoint_dict_without_batch_counters(mobilenet_file, tmp_path):
    path, net = mobilenet_file
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    file = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, file)
    blocks = DeepLabMobileNetV2(pretrained=str(file)).make_blocks()
    torch.testing.assert_close(blocks[2].conv[1][1].running_var, net.features[3].conv[1][1].running_var)


def test_pretrained_errors(mobilenet_file, tmp_path):
    path, _ = mobilenet_file
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"mobilenet_v2\(\).*missing keys: features\.0\.0\.weight.*"
                                         r"unexpected keys: conv1\.weight"):
        DeepLabMobileNetV2(pretrained=str(wrong)).make_blocks()
    with pytest.raises(ValueError, match=r"resnet34\(\).*missing keys: conv1\.weight"):
        DeepLabResNet34(pretrained=str(path)).make_blocks()
    with pytest.raises(ValueError, match=r"shape mismatches: features\.0\.0\.weight \(file \(32, 3, 3, 3\), "
                                         r"model \(32, 4, 3, 3\)\)"):
        DeepLabMobileNetV2(in_channels=4, pretrained=str(path)).make_blocks()
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*mobilenet_v2"):
        DeepLabMobileNetV2(pretrained=missing).make_blocks()
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*resnet34"):
        DeepLabResNet34(pretrained=missing).make_blocks()


def test_resnet34_pretrained_matches_torchvision_until_the_dilation(tmp_path):
    torch.manual_seed(2)
    net = randomize_batchnorm(torchvision.models.resnet34(weights=None), seed=2).eval()
    file = tmp_path / "resnet34.pth"
    torch.save(net.state_dict(), file)
    blocks = [b.eval() for b in DeepLabResNet34(pretrained=str(file)).make_blocks()]
    x = torch.randn(2, 3, 64, 64)
    outputs = run_blocks(blocks, x)
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        low = net.layer1(y)
        deep = net.layer3(net.layer2(low))
    torch.testing.assert_close(outputs[3], low, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[13], deep, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blocks[15].conv2.weight, net.layer4[2].conv2.weight, rtol=0, atol=0)


def test_resnet9_pretrained_round_trip(tmp_path):
    torch.manual_seed(3)
    source = nn.ModuleList(ResNet9(width=0.25).make_blocks())
    file = tmp_path / "resnet9.pth"
    torch.save(source.state_dict(), file)
    loaded = nn.ModuleList(ResNet9(width=0.25, pretrained=str(file)).make_blocks())
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"width=0\.5.*shape mismatches: 0\.0\.weight"):
        ResNet9(width=0.5, pretrained=str(file)).make_blocks()
    with pytest.raises(FileNotFoundError, match="ResNet9"):
        ResNet9(pretrained=str(tmp_path / "none.pth")).make_blocks()


@pytest.mark.parametrize("backbone", [
    DeepLabMobileNetV2(in_channels=4, aspp_channels=64, dropout=0.0),
    DeepLabResNet34(aspp_rates=(2, 4), pretrained="/some/file.pth", separable_decoder=True),
    ResNet9(in_channels=1, width=0.5),
])
def test_config_round_trip(backbone):
    rebuilt = build_backbone(backbone.config())
    assert type(rebuilt) is type(backbone)
    assert rebuilt.config() == backbone.config()
    assert rebuilt.num_blocks == backbone.num_blocks


@pytest.mark.parametrize("backbone, shape", [
    (DeepLabMobileNetV2(), (2, 3, 48, 48)),
    (DeepLabResNet34(), (2, 3, 48, 48)),
    (ResNet9(width=0.25), (2, 3, 32, 32)),
])
def test_anchor_specialize_equals_dynamic_forward(backbone, shape):
    torch.manual_seed(0)
    dense = not isinstance(backbone, ResNet9)
    tasks = ([make_task("semseg", out_channels=5), make_task("depth")] if dense else
             [make_task("classification", name=f"c{i}", out_channels=5) for i in range(2)])
    net = randomize_batchnorm(AnchorNet(backbone, tasks)).eval()
    assert net.n_layers == backbone.num_blocks
    x = torch.randn(*shape)
    gen = torch.Generator().manual_seed(4)
    archs = [Architecture.random(2, net.n_layers, generator=gen) for _ in range(2)]
    for arch in [Architecture(((0, 0),) * (net.n_layers - 1) + ((0, 1),)), *archs]:
        with torch.no_grad():
            dynamic = net(x, architecture=arch)
            static = net.specialize(arch).eval()(x)
        for task in tasks:
            expected = (2, task.out_channels, *shape[-2:]) if dense else (2, task.out_channels)
            assert dynamic[task.name].shape == expected
            torch.testing.assert_close(static[task.name], dynamic[task.name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        anchor = net(x)
        shared = net(x, architecture=Architecture.shared(2, net.n_layers))
    assert not torch.allclose(anchor[tasks[1].name], shared[tasks[1].name])
