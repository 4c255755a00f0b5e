"""LAVT model: the official checkpoint layout, strict loading, clear errors, forward shapes, gradients."""

from __future__ import annotations

import argparse
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from groundlabel.errors import UserError  # noqa: E402
from workers.models.lavt.config import LavtConfig  # noqa: E402
from workers.models.lavt.factory import load_network  # noqa: E402
from workers.models.lavt.model import LavtNetwork  # noqa: E402
from workers.models.lavt.synthetic import vocabulary  # noqa: E402
from workers.models.lavt.weights import (  # noqa: E402
    load_network_state,
    load_swin_imagenet,
    save_checkpoint,
    split_checkpoint,
)


def official_model_shapes(
    window: int = 12, embed: int = 128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), text_dim: int = 768
) -> dict[str, tuple[int, ...]]:
    """The ``model`` entry of an official LAVT checkpoint, written out from the published key pattern
    (Swin-B, window 12 by default) independently of the model code."""
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.patch_embed.proj.weight": (embed, 3, 4, 4),
        "backbone.patch_embed.proj.bias": (embed,),
        "backbone.patch_embed.norm.weight": (embed,),
        "backbone.patch_embed.norm.bias": (embed,),
    }
    n = window * window
    for i in range(4):
        d = embed * 2**i
        for j in range(depths[i]):
            p = f"backbone.layers.{i}.blocks.{j}."
            shapes.update(
                {
                    p + "norm1.weight": (d,),
                    p + "norm1.bias": (d,),
                    p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads[i]),
                    p + "attn.relative_position_index": (n, n),
                    p + "attn.qkv.weight": (3 * d, d),
                    p + "attn.qkv.bias": (3 * d,),
                    p + "attn.proj.weight": (d, d),
                    p + "attn.proj.bias": (d,),
                    p + "norm2.weight": (d,),
                    p + "norm2.bias": (d,),
                    p + "mlp.fc1.weight": (4 * d, d),
                    p + "mlp.fc1.bias": (4 * d,),
                    p + "mlp.fc2.weight": (d, 4 * d),
                    p + "mlp.fc2.bias": (d,),
                }
            )
        f = f"backbone.layers.{i}.fusion."
        for name, cin in (
            ("vis_project.0", d),
            ("image_lang_att.f_key.0", text_dim),
            ("image_lang_att.f_query.0", d),
            ("image_lang_att.f_value.0", text_dim),
            ("image_lang_att.W.0", d),
            ("project_mm.0", d),
        ):
            shapes[f + name + ".weight"] = (d, cin, 1)
            shapes[f + name + ".bias"] = (d,)
        shapes[f"backbone.layers.{i}.res_gate.0.weight"] = (d, d)
        shapes[f"backbone.layers.{i}.res_gate.2.weight"] = (d, d)
        if i < 3:
            shapes[f"backbone.layers.{i}.downsample.reduction.weight"] = (2 * d, 4 * d)
            shapes[f"backbone.layers.{i}.downsample.norm.weight"] = (4 * d,)
            shapes[f"backbone.layers.{i}.downsample.norm.bias"] = (4 * d,)
        shapes[f"backbone.norm{i}.weight"] = (d,)
        shapes[f"backbone.norm{i}.bias"] = (d,)
    c4 = 8 * embed
    hidden = c4 // 2
    for tag, cin in (("4", c4 + c4 // 2), ("3", hidden + c4 // 4), ("2", hidden + c4 // 8)):
        shapes[f"classifier.conv1_{tag}.weight"] = (hidden, cin, 3, 3)
        shapes[f"classifier.conv2_{tag}.weight"] = (hidden, hidden, 3, 3)
        for bn in (f"bn1_{tag}", f"bn2_{tag}"):
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"classifier.{bn}.{leaf}"] = (hidden,)
            shapes[f"classifier.{bn}.num_batches_tracked"] = ()
    shapes["classifier.conv1_1.weight"] = (2, hidden, 1, 1)
    shapes["classifier.conv1_1.bias"] = (2,)
    return shapes


def official_bert_shapes(
    layers: int = 12, width: int = 768, vocab: int = 30522
) -> dict[str, tuple[int, ...]]:
    """``bert_model`` of an official checkpoint: transformers v3.0.2 BERT, no pooler, no position_ids."""
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, width),
        "embeddings.position_embeddings.weight": (512, width),
        "embeddings.token_type_embeddings.weight": (2, width),
        "embeddings.LayerNorm.weight": (width,),
        "embeddings.LayerNorm.bias": (width,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes[p + name + ".weight"] = (width, width)
            shapes[p + name + ".bias"] = (width,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = (width,)
            shapes[p + name + ".bias"] = (width,)
        shapes[p + "intermediate.dense.weight"] = (4 * width, width)
        shapes[p + "intermediate.dense.bias"] = (4 * width,)
        shapes[p + "output.dense.weight"] = (width, 4 * width)
        shapes[p + "output.dense.bias"] = (width,)
    return shapes


def fake_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes (integer buffers get valid values)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("relative_position_index"):
            n = int(shape[0] ** 0.5)
            from workers.models.lavt.backbone import relative_position_index

            state[key] = relative_position_index(n)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    return state


@pytest.fixture(scope="module")
def swin_b() -> LavtNetwork:
    torch.manual_seed(0)
    return LavtNetwork(LavtConfig(variant="swin_b", device="cpu")).eval()


def test_swin_b_state_dict_matches_the_official_layout(swin_b):
    expected = official_model_shapes()
    own = swin_b.model.state_dict()
    assert set(own) == set(expected), (
        sorted(set(own) - set(expected))[:5],
        sorted(set(expected) - set(own))[:5],
    )
    wrong = [(k, tuple(v.shape), expected[k]) for k, v in own.items() if tuple(v.shape) != expected[k]]
    assert not wrong
    assert len(own) == 451
    bert = swin_b.bert_model.state_dict()
    assert set(bert) == set(official_bert_shapes())
    assert not any(k.startswith("pooler.") for k in bert)


def test_official_state_loads_strictly_and_exactly(swin_b):
    model_state = fake_state(official_model_shapes(), seed=1)
    bert_state = fake_state(official_bert_shapes(), seed=2)
    load_network_state(swin_b, model_state, bert_state)
    own = swin_b.model.state_dict()
    for key in (
        "backbone.layers.2.blocks.17.attn.relative_position_bias_table",
        "classifier.conv1_1.weight",
        "backbone.layers.3.res_gate.2.weight",
        "classifier.bn2_2.running_var",
    ):
        assert torch.equal(own[key], model_state[key])
    assert torch.equal(
        swin_b.bert_model.state_dict()["encoder.layer.11.output.dense.bias"],
        bert_state["encoder.layer.11.output.dense.bias"],
    )
    # A version that saved position_ids (transformers 4.x) is accepted too.
    bert_state["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    load_network_state(swin_b, model_state, bert_state)


def test_window_7_checkpoint_names_the_option(swin_b):
    model_state = fake_state(official_model_shapes(window=7), seed=3)
    with pytest.raises(UserError) as err:
        load_network_state(swin_b, model_state, None)
    message = str(err.value)
    assert "shape mismatches 48" in message  # 24 blocks x (bias table + index)
    assert "(169, 4) vs model (529, 4)" in message
    assert "window 7" in message and "--window-size 7" in message


def test_missing_and_unexpected_keys_are_listed(swin_b):
    model_state = fake_state(official_model_shapes(), seed=4)
    del model_state["classifier.conv1_1.bias"]
    del model_state["backbone.norm3.weight"]
    model_state["backbone.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(UserError) as err:
        load_network_state(swin_b, model_state, fake_state(official_bert_shapes()))
    message = str(err.value)
    assert "missing keys 2 (" in message and "classifier.conv1_1.bias" in message
    assert "unexpected keys 1 (backbone.extra_head.weight)" in message
    bert_state = fake_state(official_bert_shapes())
    del bert_state["encoder.layer.3.output.dense.weight"]
    with pytest.raises(
        UserError, match=r"BERT 'bert_model'.*missing keys 1 \(encoder.layer.3.output.dense.weight\)"
    ):
        load_network_state(swin_b, fake_state(official_model_shapes()), bert_state)


@pytest.mark.slow
def test_swin_b_forward_at_480_and_unaligned_sizes(swin_b):
    ids = torch.zeros((1, 20), dtype=torch.long)
    ids[0, :5] = torch.tensor([101, 1996, 2417, 4937, 102])
    mask = (ids > 0).long()
    with torch.inference_mode():
        out = swin_b(torch.randn(1, 3, 480, 480), ids, mask)
        odd = swin_b(torch.randn(1, 3, 200, 333), ids, mask)
        quarter = swin_b(torch.randn(1, 3, 200, 333), ids, mask, upsample=False)
    assert out.shape == (1, 2, 480, 480)
    assert odd.shape == (1, 2, 200, 333)
    assert quarter.shape == (1, 2, 50, 84)  # patch embedding pads 333 to 336
    assert torch.isfinite(out).all() and torch.isfinite(odd).all()


def tiny_network(seed: int = 0, **overrides) -> LavtNetwork:
    torch.manual_seed(seed)
    return LavtNetwork(LavtConfig(variant="tiny", device="cpu", **overrides))


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (70, 45), (33, 130)])
def test_tiny_forward_shapes(size):
    net = tiny_network().eval()
    ids = torch.tensor([[2, 5, 6, 3] + [0] * 16, [2, 7, 3] + [0] * 17])
    with torch.inference_mode():
        out = net(torch.randn(2, 3, *size), ids, (ids > 0).long())
    assert out.shape == (2, 2, *size)


def test_padding_words_do_not_change_the_output():
    net = tiny_network().eval()
    image = torch.randn(1, 3, 64, 64)
    short = torch.tensor([[2, 5, 6, 3] + [0] * 16])
    other_padding = short.clone()
    other_padding[0, 4:] = 9  # garbage after the mask: must be ignored
    with torch.inference_mode():
        a = net(image, short, (short > 0).long())
        b = net(image, other_padding, (short > 0).long())
    assert torch.allclose(a, b, atol=1e-5)


def test_gradients_reach_backbone_pwam_gates_decoder_and_bert():
    from workers.models.lavt.train import parameter_groups, segmentation_loss

    net = tiny_network(seed=1).train()
    parameter_groups(net, 0.01)  # freezes what the official recipe does not train
    ids = torch.tensor([[2, 5, 6, 3] + [0] * 16, [2, 7, 8, 9, 3] + [0] * 15])
    logits = net(torch.randn(2, 3, 64, 64), ids, (ids > 0).long())
    segmentation_loss(logits, torch.randint(0, 2, (2, 64, 64))).backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    for name in (
        "model.backbone.patch_embed.proj.weight",
        "model.backbone.layers.0.blocks.0.attn.qkv.weight",
        "model.backbone.layers.0.blocks.0.attn.relative_position_bias_table",
        "model.backbone.layers.1.fusion.image_lang_att.f_key.0.weight",
        "model.backbone.layers.2.fusion.vis_project.0.weight",
        "model.backbone.layers.3.fusion.project_mm.0.weight",
        "model.backbone.layers.0.res_gate.0.weight",
        "model.backbone.layers.2.res_gate.2.weight",
        "model.classifier.conv1_4.weight",
        "bert_model.encoder.layer.0.attention.self.query.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # The last stage's gated features feed nothing (the decoder reads the PWAM output), as officially.
    assert grads["model.backbone.layers.3.res_gate.2.weight"] is None
    # Embeddings stay at their initial values, as in the official recipe.
    assert grads["bert_model.embeddings.word_embeddings.weight"] is None


def test_checkpoint_layouts_round_trip(tmp_path):
    net = tiny_network(seed=2)
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, net, tokenizer_vocab=vocabulary(), epoch=3)
    loaded, extras = load_network(ours)
    assert extras["tokenizer_vocab"] == vocabulary() and extras["epoch"] == 3
    assert loaded.config.variant == "tiny"
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # Official layout: model + bert_model + optimizer/epoch/args (a pickled Namespace), no config.
    official = tmp_path / "official.pth"
    torch.save(
        {
            "model": net.model.state_dict(),
            "bert_model": net.bert_model.state_dict(),
            "optimizer": {},
            "epoch": 39,
            "lr_scheduler": {},
            "args": argparse.Namespace(swin_type="tiny"),
        },
        official,
    )
    loaded, _ = load_network(official, LavtConfig(variant="tiny", device="cpu"))
    assert torch.equal(loaded.model.classifier.conv1_1.weight, net.model.classifier.conv1_1.weight)
    with pytest.raises(UserError, match="use --variant"):  # default config is Swin-B
        load_network(official)

    # lavt_one layout (BERT inside the model as text_encoder.*) and a DDP-prefixed plain state dict.
    one = {
        **{f"text_encoder.{k}": v for k, v in net.bert_model.state_dict().items()},
        **net.model.state_dict(),
    }
    model_state, bert_state, _ = split_checkpoint({"model": one})
    assert set(bert_state) == set(net.bert_model.state_dict()) and set(model_state) == set(
        net.model.state_dict()
    )
    plain = {f"module.{k}": v for k, v in net.state_dict().items()}
    model_state, bert_state, _ = split_checkpoint(plain)
    assert set(model_state) == set(net.model.state_dict())


def test_unreadable_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_network(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_network(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="is a dict"):
        load_network(tmp_path / "list.pth")


def test_swin_imagenet_init_resizes_tables_and_skips_the_head(tmp_path):
    net = tiny_network(seed=3)  # window 4
    cfg = net.config
    shapes = {
        k: v
        for k, v in official_model_shapes(
            window=7, embed=cfg.embed_dim, depths=cfg.depths, heads=cfg.num_heads, text_dim=cfg.text_dim
        ).items()
        if k.startswith("backbone.")
        and ".fusion." not in k
        and "res_gate" not in k
        and not k.startswith("backbone.norm")
    }
    state = {k.replace("backbone.", "", 1): v for k, v in fake_state(shapes, seed=5).items()}
    state["head.weight"] = torch.zeros(1000, 8 * cfg.embed_dim)
    state["norm.weight"] = torch.ones(8 * cfg.embed_dim)
    path = tmp_path / "swin.pth"
    torch.save({"model": state}, path)
    loaded, left = load_swin_imagenet(net.model.backbone, path)
    table = net.model.backbone.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (49, cfg.num_heads[0])
    assert torch.equal(net.model.backbone.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert any("fusion" in k for k in left) and any("res_gate" in k for k in left)
    assert loaded > 10
