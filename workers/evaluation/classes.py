"""Class names of the zero-shot semantic-segmentation benchmarks, as the training-free papers prompt them.

Each class is a tuple of synonyms; a class's score is the best of its synonyms. The lists follow the
label order of mmsegmentation's converted datasets (the order of the label ids). Names are written
with spaces ("potted plant", "traffic light") so that CLIP's tokenizer sees words. The VOC and Context
background class (label 0) is never prompted: it is predicted where no class scores above the
background threshold.
"""

from __future__ import annotations

Classes = tuple[tuple[str, ...], ...]


def _plain(names: str) -> Classes:
    return tuple((n.strip(),) for n in names.split(",") if n.strip())


VOC20: Classes = (
    ("aeroplane",),
    ("bicycle",),
    ("bird",),
    ("ship",),
    ("bottle",),
    ("bus",),
    ("car",),
    ("cat",),
    ("chair",),
    ("cow",),
    ("table",),
    ("dog",),
    ("horse",),
    ("motorbike",),
    (
        "person",
        "person in shirt",
        "person in jeans",
        "person in dress",
        "person in sweater",
        "person in skirt",
        "person in jacket",
    ),
    ("potted plant",),
    ("sheep",),
    ("sofa",),
    ("train",),
    ("television monitor", "tv monitor", "monitor", "television", "screen"),
)

CONTEXT59: Classes = _plain(
    "aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, "
    "cabinet, car, cat, ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, floor, "
    "flower, food, grass, ground, horse, keyboard, light, motorbike, mountain, mouse, person, plate, "
    "platform, potted plant, road, rock, sheep, shelves, sidewalk, sign, sky, snow, sofa, table, "
    "track, train, tree, truck, tv monitor, wall, water, window, wood"
)

ADE150: Classes = _plain(
    "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, "
    "person, earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf, "
    "house, sea, mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub, "
    "railing, cushion, base, box, column, signboard, chest of drawers, counter, sand, sink, "
    "skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case, pool table, pillow, "
    "screen door, stairway, river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill, "
    "bench, countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar, "
    "arcade machine, hovel, bus, towel, light, truck, tower, chandelier, awning, streetlight, booth, "
    "television receiver, airplane, dirt track, apparel, pole, land, bannister, escalator, ottoman, "
    "bottle, buffet, poster, stage, van, ship, fountain, conveyer belt, canopy, washer, plaything, "
    "swimming pool, stool, barrel, basket, waterfall, tent, bag, minibike, cradle, oven, ball, food, "
    "step, tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket, "
    "sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate, "
    "monitor, bulletin board, shower, radiator, glass, clock, flag"
)

COCO_STUFF171: Classes = _plain(
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, "
    "stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, "
    "giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, "
    "baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, wine glass, cup, "
    "fork, knife, spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, "
    "donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, laptop, mouse, remote, "
    "keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors, "
    "teddy bear, hair drier, toothbrush, banner, blanket, branch, bridge, building, bush, cabinet, "
    "cage, cardboard, carpet, ceiling, ceiling tile, cloth, clothes, clouds, counter, cupboard, "
    "curtain, desk, dirt, door, fence, marble floor, floor, stone floor, floor tile, wood floor, "
    "flower, fog, food, fruit, furniture, grass, gravel, ground, hill, house, leaves, light, mat, "
    "metal, mirror, moss, mountain, mud, napkin, net, paper, pavement, pillow, plant, plastic, "
    "platform, playing field, railing, railroad, river, road, rock, roof, rug, salad, sand, sea, "
    "shelf, sky, skyscraper, snow, solid, stairs, stone, straw, structural, table, tent, textile, "
    "towel, tree, vegetable, brick wall, concrete wall, wall, wall panel, stone wall, wall tile, "
    "wood wall, water, waterdrops, window blind, window, wood"
)

CITYSCAPES19: Classes = _plain(
    "road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain, "
    "sky, person, rider, car, truck, bus, train, motorcycle, bicycle"
)

assert len(VOC20) == 20 and len(CONTEXT59) == 59 and len(ADE150) == 150
assert len(COCO_STUFF171) == 171 and len(CITYSCAPES19) == 19
