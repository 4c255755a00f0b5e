"""LAVT data reading, metrics, training on a generated referring dataset, and the CLI verbs."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from groundlabel.errors import UserError  # noqa: E402
from workers.models.lavt.config import LavtConfig  # noqa: E402
from workers.models.lavt.data import Refer, RefSegmentation, split_matches, summarize  # noqa: E402
from workers.models.lavt.model import LavtNetwork  # noqa: E402
from workers.models.lavt.synthetic import make_dataset, write_vocab  # noqa: E402
from workers.models.lavt.text import load_tokenizer  # noqa: E402
from workers.models.lavt.train import TrainOptions, evaluate, parameter_groups, poly_lambda, train  # noqa: E402


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("refs"), images=6, val_images=3, size=64, seed=7)
    return root, write_vocab(root / "vocab.txt")


def test_refer_reads_the_generated_files(small_dataset):
    root, _ = small_dataset
    refer = Refer(root)
    assert refer.splits() == ["train", "val"]
    assert len(refer.ref_ids("train")) == 12 and len(refer.ref_ids("val")) == 6
    ref = refer.ref_by_id[refer.ref_ids("val")[0]]
    mask = refer.mask(ref)
    assert mask.shape == (64, 64) and mask.dtype == np.uint8 and 30 < mask.sum() < 64 * 64 / 2
    assert refer.image_path(ref).is_file()


def test_split_rule_matches_refer():
    assert (
        split_matches("testA", "testA")
        and split_matches("testA", "testAB")
        and split_matches("testB", "testAB")
    )
    assert (
        split_matches("test", "testB")
        and not split_matches("val", "valB")
        and split_matches("train", "train")
    )


def test_overlapping_polygons_follow_lavts_quirk(tmp_path):
    """Parts of one object that overlap sum to 2: LAVT (``== 1``) drops them, ``union`` keeps them."""
    (tmp_path / "refcoco").mkdir()
    square = [0, 0, 20, 0, 20, 20, 0, 20]
    shifted = [10, 10, 30, 10, 30, 30, 10, 30]
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}],
        "annotations": [
            {
                "id": 5,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [square, shifted],
                "area": 700,
                "bbox": [0, 0, 30, 30],
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(instances))
    refs = [
        {
            "ref_id": 0,
            "ann_id": 5,
            "image_id": 1,
            "category_id": 1,
            "split": "train",
            "sent_ids": [0],
            "sentences": [
                {"raw": "the thing", "sent": "the thing", "tokens": ["the", "thing"], "sent_id": 0}
            ],
        }
    ]
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    refer = Refer(tmp_path)
    lavt, union = refer.mask(refs[0], "lavt"), refer.mask(refs[0], "union")
    assert union[15, 15] == 1 and lavt[15, 15] == 0  # the overlap
    assert lavt[5, 5] == 1 and lavt[25, 25] == 1
    assert union.sum() - lavt.sum() == refer.part_sum(refs[0]).__eq__(2).sum() > 0


def test_bad_datasets_give_reasons(tmp_path):
    with pytest.raises(UserError, match=r"refs\(unc\).p not found"):
        Refer(tmp_path)
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(
        pickle.dumps([{"ref_id": 1, "ann_id": 9, "image_id": 1, "split": "train", "sentences": [{}]}])
    )
    with pytest.raises(UserError, match="annotation 9"):
        Refer(tmp_path)
    # A refs pickle that would construct objects is refused, not executed.
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([{"x": np.int64(3)}]))
    with pytest.raises(UserError, match="plain lists"):
        Refer(tmp_path)


def test_metrics_follow_lavts_definitions():
    metrics = summarize([50.0, 0.0, 90.0], [100.0, 0.0, 100.0])
    assert metrics["oIoU"] == pytest.approx(140 / 200)
    assert metrics["mIoU"] == pytest.approx((0.5 + 0.0 + 0.9) / 3)  # U = 0 counts 0
    assert metrics["P@0.5"] == pytest.approx(2 / 3) and metrics["P@0.9"] == pytest.approx(1 / 3)


def test_optimizer_groups_and_schedule():
    torch.manual_seed(0)
    net = LavtNetwork(
        LavtConfig(
            variant="tiny",
            bert_config={
                "vocab_size": 64,
                "hidden_size": 32,
                "num_hidden_layers": 12,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 32,
            },
        )
    )
    groups = parameter_groups(net, 0.01)
    no_decay = {id(p) for p in groups[0]["params"]}
    named = dict(net.model.backbone.named_parameters())
    assert id(named["layers.0.blocks.0.attn.relative_position_bias_table"]) in no_decay
    assert id(named["norm2.weight"]) in no_decay and id(named["layers.1.downsample.norm.weight"]) in no_decay
    assert id(named["layers.0.blocks.0.attn.qkv.weight"]) not in no_decay
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.01
    bert_ids = {id(p) for p in groups[3]["params"]}
    layers = net.bert_model.encoder.layer
    assert all(id(p) in bert_ids for i in range(10) for p in layers[i].parameters())
    assert not any(id(p) in bert_ids for i in (10, 11) for p in layers[i].parameters())
    assert not net.bert_model.embeddings.word_embeddings.weight.requires_grad
    schedule = poly_lambda(100)
    assert schedule(0) == 1.0 and schedule(50) == pytest.approx(0.5**0.9) and schedule(100) == 0.0


@pytest.mark.slow
def test_training_on_generated_shapes_beats_the_untrained_model(tmp_path, one_thread):
    root = make_dataset(tmp_path / "data", images=80, val_images=16, size=64, seed=11)
    vocab = write_vocab(tmp_path / "vocab.txt")
    config = LavtConfig(variant="tiny", image_size=64, tokenizer=str(vocab), device="cpu")
    refer = Refer(root)
    val = RefSegmentation(refer, "val", load_tokenizer(str(vocab)), image_size=64)
    torch.manual_seed(11)
    before = evaluate(LavtNetwork(config), val, device=torch.device("cpu"), progress=False)

    options = TrainOptions(
        data_root=str(root),
        output=str(tmp_path / "run"),
        epochs=8,
        batch_size=8,
        lr=1e-3,
        workers=0,
        bert="none",
        seed=11,
        model=config,
    )
    result = train(options, progress=False)
    after = result["final"]["val"]
    assert after["mIoU"] >= before["mIoU"] + 0.2 and after["mIoU"] >= 2 * before["mIoU"], (before, after)
    assert after["oIoU"] >= before["oIoU"] + 0.2
    assert len(result["epochs"]) == 8 and result["epochs"][-1]["loss"] < result["epochs"][0]["loss"]
    assert (tmp_path / "run" / "checkpoint_last.pth").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["val"]["samples"] == 64

    # The language matters: the mask follows the named object, not just any shape in the picture.
    from PIL import Image

    from workers.models.lavt import LavtEngine

    engine = LavtEngine(result["checkpoint"], LavtConfig(device="cpu"))
    own, other = [], []
    for ref_id in refer.ref_ids("val"):
        ref = refer.ref_by_id[ref_id]
        sibling = next(r for r in refer.refs if r["image_id"] == ref["image_id"] and r["ref_id"] != ref_id)
        with Image.open(refer.image_path(ref)) as im:
            prob, _ = engine.probabilities([im.convert("RGB")], [ref["sentences"][0]["raw"]])[0]
        pred = prob > 0.5
        for target, bucket in ((refer.mask(ref), own), (refer.mask(sibling), other)):
            union = np.logical_or(pred, target).sum()
            bucket.append(np.logical_and(pred, target).sum() / union if union else 0.0)
    assert np.mean(own) >= np.mean(other) + 0.3, (np.mean(own), np.mean(other))


def test_cli_train_resume_and_eval(small_dataset, tmp_path, capsys, one_thread):
    from groundlabel_cli.main import main

    root, vocab = small_dataset
    common = [
        "--variant",
        "tiny",
        "--image-size",
        "64",
        "--tokenizer",
        str(vocab),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    out = tmp_path / "run"
    argv = [
        "train-lavt",
        str(root),
        *common,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--bert",
        "none",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "oIoU" in printed and "val " in printed and "checkpoint:" in printed
    last = torch.load(out / "checkpoint_last.pth", weights_only=False)
    assert last["epoch"] == 0 and {"model", "bert_model", "config", "tokenizer_vocab", "optimizer"} <= set(
        last
    )

    # --resume continues at epoch 2 with the optimizer state.
    assert (
        main(
            argv[:-3]
            + [
                "--epochs",
                "2",
                "--resume",
                str(out / "checkpoint_last.pth"),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert torch.load(out / "checkpoint_last.pth", weights_only=False)["epoch"] == 1
    capsys.readouterr()

    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval-lavt",
                str(root),
                "--checkpoint",
                str(out / "model_best.pth"),
                "--split",
                "val,train",
                "--device",
                "cpu",
                "--workers",
                "0",
                "--json",
                str(report),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "P@0.9" in printed and printed.count("\n") >= 3
    metrics = json.loads(report.read_text())
    assert metrics["val"]["samples"] == 12 and metrics["train"]["samples"] == 24

    assert main(["eval-lavt", str(tmp_path / "missing"), "--checkpoint", str(out / "model_best.pth")]) == 2
    assert "refs(unc).p not found" in capsys.readouterr().err


EXPORT_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="circle"/><Label value="square"/><Label value="triangle"/>
  </PolygonLabels>
  <TextArea name="expr" toName="image" perRegion="true"/>
</View>"""


def test_trains_on_what_the_refcoco_exporter_writes(small_dataset, tmp_path, capsys, one_thread):
    """Label Studio annotations → export_refcoco → train-lavt / eval-lavt: the loop closes."""
    exporters = pytest.importorskip("exporters")
    from exporters.synthetic import polygon_result, text_result
    from groundlabel_cli.main import main

    root, vocab = small_dataset
    source = Refer(root)
    media = tmp_path / "media"
    (media / "upload" / "1").mkdir(parents=True)
    tasks = []
    for image_id, image in source.images.items():
        (media / "upload" / "1" / image["file_name"]).write_bytes(
            (source.image_dir / image["file_name"]).read_bytes()
        )
        w, h = image["width"], image["height"]
        results = []
        for ref in (r for r in source.refs if r["image_id"] == image_id):
            flat = source.anns[ref["ann_id"]]["segmentation"][0]
            points = [[100 * flat[k] / w, 100 * flat[k + 1] / h] for k in range(0, len(flat), 2)]
            label = {1: "circle", 2: "square", 3: "triangle"}[ref["category_id"]]
            region = polygon_result(points, label, w, h)
            results += [region, text_result([s["raw"] for s in ref["sentences"]], rid=region["id"])]
        tasks.append(
            {
                "id": image_id,
                "data": {"image": f"/data/upload/1/{image['file_name']}"},
                "annotations": [{"id": image_id, "result": results}],
            }
        )
    out = tmp_path / "exported"
    exporters.export_refcoco(
        tasks,
        out,
        label_config=EXPORT_CONFIG,
        fractions=(0.6, 0.4, 0.0, 0.0),
        seed=3,
        resolver=exporters.ImageResolver(images_root=media),
    )
    exported = Refer(out)
    assert len(exported.refs) == len(source.refs) and set(exported.splits()) <= {"train", "val"}
    source_image = {im["file_name"]: image_id for image_id, im in source.images.items()}
    for ref in exported.refs:
        image_id = source_image[exported.images[ref["image_id"]]["file_name"]]
        raws = [s["raw"] for s in ref["sentences"]]
        (original,) = [
            r for r in source.refs if r["image_id"] == image_id and [s["raw"] for s in r["sentences"]] == raws
        ]
        a, b = exported.mask(ref), source.mask(original)
        assert (a & b).sum() / max(1, (a | b).sum()) > 0.9

    run = tmp_path / "run"
    assert (
        main(
            [
                "train-lavt",
                str(out),
                "--variant",
                "tiny",
                "--image-size",
                "64",
                "--tokenizer",
                str(vocab),
                "--device",
                "cpu",
                "--workers",
                "0",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--bert",
                "none",
                "--output",
                str(run),
                "--no-progress",
                "--val-split",
                "val",
            ]
        )
        == 0
    )
    assert (run / "model_best.pth").is_file() and "val " in capsys.readouterr().out
