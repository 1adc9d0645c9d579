"""`modrwkv data shapes`: a synthetic VQA set whose answers are certain, to measure how much of what the image
features hold a trained model uses (a probe on the same features is the ceiling).

PIL draws 1-3 filled shapes on a white 64 px canvas and each image gets one question, in LLaVA's convention
(`<image>\\n` then the question) with a one-word answer. Question types, in equal numbers:
- colour: "What colour is the shape?" (one shape; 8 colours);
- shape: "What shape is this?" (one shape; circle, square, triangle);
- position: "Where is the shape?" (one shape, against one edge: left, right, top, bottom);
- count: "How many shapes are there?" (one, two, three);
- yes/no: "Is there a <colour> shape?" or "Is there a <shape>?" (1-3 shapes; yes half the time).
Each record also carries its question type under "type", which readers ignore and the benchmark groups by.

Each training image also gets `extra_yesno` records (default 1) of different yes/no questions about its own shapes,
`yesno_per_shape` for each shape drawn (default 3: 3, 6 or 9 questions), each colour- or shape-asked and yes or
no at random, asked in turn as LLaVA's multi-turn records ask them, as VQAv2 asks several questions of one image. With
one question per image the tiny backbone memorises each training image's yes/no answer instead of learning to compare
the asked word with what it sees; it memorises them on 2,000 training images
as well, most of all where one of two or three shapes is the one asked about, so `modrwkv data shapes` makes 8,000;
and with three questions an image, images of three shapes, where a near hue is asked beside the drawn ones, are the
least practised, hence three a shape. (The experiments: benchmarks/RESULTS.md, "Learning quality", the shapes
suite's.) The test split keeps one question per image.
"""

import hashlib
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .demo_data import write_json

COLOURS = {"red": (215, 35, 35), "green": (40, 160, 50), "blue": (35, 70, 215), "yellow": (235, 205, 30),
           "purple": (135, 45, 170), "orange": (245, 135, 20), "brown": (115, 70, 30), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("one", "two", "three")
QUESTION_TYPES = ("colour", "shape", "position", "count", "yesno")
CANVAS, SIZE = 64, 18  # shape bounding box side, px
# the shipped set's size: 2,000 training images are memorised; 500 test questions a type, since on 100 yes/no
# questions one model's score moved by up to 0.06 between test draws
TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES = 8000, 2500, 2500
YESNO_PER_SHAPE = 3  # different yes/no questions an extra record asks per shape drawn (yes/no 0.949 -> 0.967)
ASKABLE = len(COLOURS) + len(SHAPES)  # the different yes/no questions an image can be asked


def draw(canvas: ImageDraw.ImageDraw, shape: str, colour: str, x: int, y: int) -> None:
    """One filled shape with its bounding box's top-left corner at (x, y)."""
    box = (x, y, x + SIZE - 1, y + SIZE - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif shape == "square":
        canvas.rectangle(box, fill=fill)
    else:
        canvas.polygon([(x + SIZE // 2, y), (x, y + SIZE - 1), (x + SIZE - 1, y + SIZE - 1)], fill=fill)


def edge_corner(position: str, rng: random.Random) -> tuple[int, int]:
    """A top-left corner that puts the shape 1-4 px from one edge, about centred along it (within 12 px): at least
    11 px from every other edge, so the answer stays certain: 400 places for each shape and colour (52 before)."""
    gap = rng.randint(1, 4)
    near, far, mid = gap, CANVAS - SIZE - gap, (CANVAS - SIZE) // 2 + rng.randint(-12, 12)
    return {"left": (near, mid), "right": (far, mid), "top": (mid, near), "bottom": (mid, far)}[position]


def free_corners(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """n positions apart: one per cell of a 3 x 3 grid, jittered inside it, a pixel or more between two shapes (at
    the cell's last place two touched, and read as one)."""
    cell = CANVAS // 3
    cells = rng.sample([(i, j) for i in range(3) for j in range(3)], n)
    return [(i * cell + rng.randint(0, cell - SIZE - 1), j * cell + rng.randint(0, cell - SIZE - 1)) for i, j in cells]


def make_item(kind: str, rng: random.Random) -> tuple[list[tuple[str, str, int, int]], str, str]:
    """(shapes drawn as (shape, colour, x, y), question, answer) for one question type."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    if kind in ("colour", "shape"):
        x, y = rng.randint(4, CANVAS - SIZE - 4), rng.randint(4, CANVAS - SIZE - 4)
        question = "What colour is the shape?" if kind == "colour" else "What shape is this?"
        return [(shape, colour, x, y)], question, colour if kind == "colour" else shape
    if kind == "position":
        position = rng.choice(POSITIONS)
        return [(shape, colour, *edge_corner(position, rng))], "Where is the shape?", position
    n = rng.randint(1, 3)
    drawn = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y) for x, y in free_corners(n, rng)]
    if kind == "count":
        return drawn, "How many shapes are there?", COUNTS[n - 1]
    question, answer = yesno_question(drawn, rng.random() < 0.5, rng)
    return drawn, question, answer


def image_split(shapes: list[tuple[str, str, int, int]]) -> str:
    """The one split an image (the shapes drawn, where) may be drawn for: a tenth of the images for test, a tenth for
    val, by their hash. The images' space is small for some types (a position question's: 9,600, 1,248 before; one
    shape in a grid cell: 1,944), and drawn freely 365 of test's 500 position questions repeated a training image
    and question; partitioned, no image is in two splits, with any question (a training image's extra yes/no
    questions too), and no split depends on another's size."""
    bucket = int.from_bytes(hashlib.sha256(repr(tuple(shapes)).encode()).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def item_for(split: str, kind: str, rng: random.Random, tries: int = 10_000):
    """`make_item`'s draw, drawn again until its image is one of `split`'s."""
    for _ in range(tries):
        shapes, question, answer = make_item(kind, rng)
        if image_split(shapes) == split:
            return shapes, question, answer
    raise ValueError(f"{tries} {kind} items drawn, none of them on one of the {split} split's images")


def yesno_question(drawn: list[tuple[str, str, int, int]], by_colour: bool, rng: random.Random) -> tuple[str, str]:
    """A question naming a colour (or a shape) that is drawn ("yes") or not ("no"), half the time each."""
    present = {c for _, c, _, _ in drawn} if by_colour else {s for s, _, _, _ in drawn}
    options = list(COLOURS) if by_colour else list(SHAPES)
    if rng.random() < 0.5:
        asked, answer = rng.choice(sorted(present)), "yes"
    else:
        absent = [o for o in options if o not in present]
        asked, answer = (rng.choice(absent), "no") if absent else (rng.choice(sorted(present)), "yes")
    return (f"Is there a {asked} shape?" if by_colour else f"Is there a {asked}?"), answer


def distinct_yesno(drawn: list[tuple[str, str, int, int]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n different yes/no questions about the drawn shapes, each drawn as `yesno_question` draws one."""
    asked = {}
    while len(asked) < n:
        question, answer = yesno_question(drawn, rng.random() < 0.5, rng)
        asked.setdefault(question, answer)
    return list(asked.items())


def record(record_id: str, image: str, kind: str, turns: list[tuple[str, str]]) -> dict:
    """One LLaVA record: the image before the first question, then (question, answer) turns."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": f"<image>\n{question}" if i == 0 else question},
                          {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "type": kind, "conversations": conversations}


def build_shapes(out, n_train: int = TRAIN_IMAGES, n_test: int = TEST_IMAGES, seed: int = 0,
                 extra_yesno: int = 1, yesno_per_shape: int = YESNO_PER_SHAPE, yesno_turns: int | None = None,
                 n_val: int = VAL_IMAGES) -> Path:
    """train.json / val.json / test.json (LLaVA format) and images/ under `out`; question types cycle, so each split
    holds them in equal numbers, and each training image gets `extra_yesno` more records of different yes/no
    questions, `yesno_per_shape` for each shape drawn (at most `ASKABLE`, all there are), asked in turn; or, with
    `yesno_turns`, that many whatever the shapes drawn (the sets measured before the count followed the shapes:
    1, then 3; benchmarks/experiments.py's yes/no data)."""
    for name, count in (("yesno_per_shape", yesno_per_shape), ("yesno_turns", yesno_turns)):
        if count is not None and not 1 <= count <= ASKABLE:
            raise ValueError(f"{name} must be 1-{ASKABLE} (the different questions an image can be asked), got {count}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # test, val and the extra questions draw from their own generators, each split from its own images
    # (`image_split`): no split depends on another's size, no image is in two, and no split's images depend on the
    # extra questions
    extra_rng = random.Random(f"{seed}-extra-yesno")
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        rng = random.Random(seed if split == "train" else f"{seed}-{split}")
        records = []
        for i in range(n):
            kind = QUESTION_TYPES[i % len(QUESTION_TYPES)]
            shapes, question, answer = item_for(split, kind, rng)
            image = Image.new("RGB", (CANVAS, CANVAS), "white")
            canvas = ImageDraw.Draw(image)
            for shape, colour, x, y in shapes:
                draw(canvas, shape, colour, x, y)
            name = f"images/{split}-{i:05d}.png"
            image.save(out / name)
            records.append(record(f"shapes-{split}-{i:05d}", name, kind, [(question, answer)]))
            for j in range(extra_yesno if split == "train" else 0):
                asked = yesno_turns if yesno_turns is not None else min(yesno_per_shape * len(shapes), ASKABLE)
                turns = distinct_yesno(shapes, asked, extra_rng)
                records.append(record(f"shapes-{split}-{i:05d}-yesno{j}", name, "yesno", turns))
        write_json(out / f"{split}.json", records)
    return out
