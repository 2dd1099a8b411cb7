"""The shapes world: seeded scenes of coloured shapes and questions about them (numpy + Pillow).

    scene = make_scene(np.random.default_rng(7))
    image, labels = render(scene)          # uint8 [H, W, 3], int16 [H, W] (visible shape or -1)
    for q in questions(scene, rng): q.prompt, q.answer

A scene is 1..max_shapes shapes (circle / square / triangle in red / green / blue / yellow, each
(kind, colour) pair at most once, so "the red circle" names one shape) at random places and sizes
on a noisy, striped or graded background, in an image of random size and aspect ratio (so the
processor's tiling gives one to several crops). Shapes may overlap at their edges; a shape's
centre is never covered (the pointing target is its centre, and `render` checks it is visible).

Questions use Molmo's own answer styles. Coordinates are percent of the image width / height
like the official model's, written as whole numbers (two digits instead of four per coordinate;
the runtime's parser reads both):

    point      "Point to the red circle."      <point x="35" y="60" alt="red circle">red circle</point>
    point_all  "Point to all circles."         <points x1="20" y1="31" x2="70" y2="64" alt="circles">circles</points>
                                               (one: <point ...>; none: "There are none.")
    count      "How many circles are there?"   2
    color      "What color is the square?"     blue        (only asked when there is one square)
    describe   "Describe this image."          a red circle, a blue square and a green triangle.

Answers are what the model writes after the prompt; the trained model writes them with a
leading space (Molmo's style), which scoring strips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 220), "yellow": (235, 205, 40)}
KINDS = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
QUESTION_KINDS = ("point", "point_all", "count", "color", "describe")
NONE_ANSWER = "There are none."


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float  # centre, pixels
    cy: float
    r: float  # circle radius; half side of a square; circumradius of a triangle
    angle: float = 0.0  # triangle rotation, radians

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]
    background: int  # seed of the background texture
    style: str  # "noise" | "stripes" | "gradient"


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_KINDS
    prompt: str
    answer: str
    targets: tuple[int, ...] = ()  # indices into scene.shapes the answer is about
    value: str = ""  # the expected count / colour


def percent(v: float, size: int) -> int:
    return int(round(100.0 * v / size))


# -- scenes -------------------------------------------------------------------------------------

def make_scene(rng: np.random.Generator, min_shapes: int = 1, max_shapes: int = 4,
               min_side: int = 56, max_side: int = 128) -> Scene:
    """One random scene; shapes are placed by rejection so that no centre is covered."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    n = int(rng.integers(min_shapes, max_shapes + 1))
    pairs = [(k, c) for k in KINDS for c in COLORS]
    order = rng.permutation(len(pairs))[:n]
    shapes: list[Shape] = []
    short = min(w, h)
    for i in order:
        kind, color = pairs[i]
        for _ in range(200):
            r = float(rng.uniform(0.09, 0.16) * short + 4)
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            # Centres far enough apart that no shape reaches another's centre (a square's
            # corner is at 1.42 r, a triangle's vertex at r; 0.8 (r1 + r2) > 1.42 max(r)
            # needs similar radii, so also keep 1.5 x the larger radius).
            if all(math.hypot(cx - s.cx, cy - s.cy) > max(0.8 * (r + s.r), 1.5 * max(r, s.r))
                   for s in shapes):
                shapes.append(Shape(kind, color, cx, cy, r, float(rng.uniform(-0.4, 0.4))))
                break
    style = ("noise", "stripes", "gradient")[int(rng.integers(3))]
    return Scene(w, h, tuple(shapes), int(rng.integers(2**31)), style)


def _polygon(s: Shape) -> list[tuple[float, float]]:
    if s.kind == "square":
        return [(s.cx - s.r, s.cy - s.r), (s.cx + s.r, s.cy - s.r), (s.cx + s.r, s.cy + s.r),
                (s.cx - s.r, s.cy + s.r)]
    # triangle: vertices on the circumcircle, one pointing up (rotated by angle)
    return [(s.cx + s.r * math.sin(s.angle + k * 2 * math.pi / 3),
             s.cy - s.r * math.cos(s.angle + k * 2 * math.pi / 3)) for k in range(3)]


def _background(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.background)
    h, w = scene.height, scene.width
    base = rng.uniform(90, 200) + rng.uniform(-20, 20, size=3)  # greyish, low saturation
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if scene.style == "stripes":
        period = rng.uniform(6, 20)
        theta = rng.uniform(0, math.pi)
        yy, xx = np.ogrid[0:h, 0:w]
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        img = img + (rng.uniform(10, 30) * np.sign(np.sin(2 * math.pi * phase)))[..., None]
    elif scene.style == "gradient":
        ramp = np.linspace(-1, 1, w if rng.integers(2) else h, dtype=np.float32)
        ramp = ramp[None, :] if ramp.shape[0] == w else ramp[:, None]
        img = img + (rng.uniform(20, 50) * ramp)[..., None]
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(4, 16))
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """-> (image uint8 [H, W, 3], labels int16 [H, W]: index of the visible shape or -1)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(_background(scene))
    labels = Image.new("L", (scene.width, scene.height), 0)
    draw, ldraw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    rng = np.random.default_rng(scene.background + 1)
    for i, s in enumerate(scene.shapes):
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[s.color])
        for d, value in ((draw, fill), (ldraw, i + 1)):
            if s.kind == "circle":
                d.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=value)
            else:
                d.polygon(_polygon(s), fill=value)
    lab = np.asarray(labels, dtype=np.int16) - 1
    for i, s in enumerate(scene.shapes):
        if lab[int(s.cy), int(s.cx)] != i:
            raise AssertionError(f"scene generator bug: the centre of shape {i} is covered")
    return np.asarray(image), lab


# -- questions and answers ----------------------------------------------------------------------

def point_answer(points: list[tuple[int, int]], label: str) -> str:
    """Molmo's pointing answer for integer percent coordinates."""
    if not points:
        return NONE_ANSWER
    if len(points) == 1:
        x, y = points[0]
        return f'<point x="{x}" y="{y}" alt="{label}">{label}</point>'
    coords = " ".join(f'x{i}="{x}" y{i}="{y}"' for i, (x, y) in enumerate(points, 1))
    return f'<points {coords} alt="{label}">{label}</points>'


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """One question of `kind` about the scene (None where the kind does not apply)."""
    shapes = scene.shapes
    if kind == "point":
        i = int(rng.integers(len(shapes)))
        s = shapes[i]
        xy = [(percent(s.cx, scene.width), percent(s.cy, scene.height))]
        return Question(kind, f"Point to the {s.name}.", point_answer(xy, s.name), (i,))
    if kind == "describe":
        by_x = sorted(range(len(shapes)), key=lambda j: shapes[j].cx)
        text = _join([f"a {shapes[j].name}" for j in by_x]) + "."
        return Question(kind, "Describe this image.", text, tuple(by_x))
    present = sorted({s.kind for s in shapes})
    # "Point to all" mostly asks about a kind that is there ("There are none." 1 time in ~7).
    pool = present if kind == "point_all" and rng.random() < 0.85 else KINDS
    shape_kind = pool[int(rng.integers(len(pool)))]
    idx = tuple(j for j, s in enumerate(shapes) if s.kind == shape_kind)
    plural = PLURAL[shape_kind]
    if kind == "point_all":
        # left to right (then top to bottom), as the ordering the model learns
        order = sorted(idx, key=lambda j: (shapes[j].cx, shapes[j].cy))
        xy = [(percent(shapes[j].cx, scene.width), percent(shapes[j].cy, scene.height))
              for j in order]
        return Question(kind, f"Point to all {plural}.", point_answer(xy, plural), tuple(order))
    if kind == "count":
        return Question(kind, f"How many {plural} are there?", str(len(idx)), idx, str(len(idx)))
    if kind == "color":
        if len(idx) != 1:
            return None
        color = shapes[idx[0]].color
        return Question(kind, f"What color is the {shape_kind}?", color, idx, color)
    raise ValueError(f"unknown question kind {kind!r}")


def sample_question(scene: Scene, rng: np.random.Generator,
                    weights: dict[str, float]) -> Question:
    """A question of a kind drawn with `weights` (redrawn where a kind does not apply)."""
    kinds = list(weights)
    p = np.asarray([weights[k] for k in kinds], dtype=np.float64)
    p /= p.sum()
    for _ in range(1000):
        q = ask(scene, kinds[int(rng.choice(len(kinds), p=p))], rng)
        if q is not None:
            return q
    # e.g. colour questions only, on a scene with no kind of shape that occurs exactly once
    raise ValueError(f"no question of the kinds {kinds} applies to this scene")


# -- the held-out set ---------------------------------------------------------------------------

HELDOUT_SEED = 20261201  # training draws from other seeds (molmo_export.train_demo)
HELDOUT_MIX = {"point": 0.3, "point_all": 0.1, "count": 0.25, "color": 0.25, "describe": 0.1}


def heldout_set(n: int = 600, seed: int = HELDOUT_SEED) -> list[tuple[Scene, Question]]:
    """n (scene, question) pairs, one scene each, drawn from `seed` with HELDOUT_MIX."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = make_scene(rng)
        out.append((scene, sample_question(scene, rng, HELDOUT_MIX)))
    return out
