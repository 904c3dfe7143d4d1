"""ShapesVQA questions: seven families, exact answers from the scene graph, reference programs.

Each family poses a question with fixed wording (a program sampler parses it), its answer computed
from the scene graph, and a readable reference program against the ImagePatch API that reaches the
answer from pixels. Questions are well posed: a referent ("the red shape") selects exactly one shape;
spatial and extreme questions need the compared centres to differ by a clear margin.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from vpd_jax.worlds.knowledge import RELATIONS, lookup
from vpd_jax.worlds.render import render
from vpd_jax.worlds.scene import COLORS, SHAPES, SIZES, Scene, SceneConfig, Shape, generate_scene

FAMILIES = ("count", "exist", "attribute", "spatial", "compare", "extreme", "knowledge")
DIRECTIONS = ("left", "right", "top", "bottom")
SPATIAL_RELATIONS = ("to the left of", "to the right of", "above", "below")
NOUN_PATTERN = (f"(?:(?:{'|'.join(SIZES)}) )?(?:(?:{'|'.join(COLORS)}) )?"
                f"(?:{'|'.join(SHAPES)}|shape)")
# Centres compared in spatial/extreme questions differ by at least this much (normalised) plus a
# quarter of the two radii, so partial occlusion cannot flip the answer a detector's boxes give.
SEPARATION = 0.04
_KNOWLEDGE_TEMPLATES = {
    "designer": "Who designed the {}?",
    "year": "In what year was the {} designed?",
    "material": "What is the {} made of?",
}
# direction -> (builtin that picks the patch, centre attribute, variable name)
_EXTREME_CODE = {
    "left": ("min", "horizontal_center", "leftmost_patch"),
    "right": ("max", "horizontal_center", "rightmost_patch"),
    "top": ("min", "vertical_center", "topmost_patch"),
    "bottom": ("max", "vertical_center", "bottommost_patch"),
}


@dataclasses.dataclass(frozen=True)
class Noun:
    """A noun phrase [size] [colour] (shape-name | "shape") and the shapes it selects."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    @property
    def text(self) -> str:
        return " ".join(p for p in (self.size, self.color, self.shape or "shape") if p)

    @property
    def plural(self) -> str:
        return self.text + "s"

    @property
    def var(self) -> str:
        return self.text.replace(" ", "_")

    @property
    def num_attributes(self) -> int:
        return sum(p is not None for p in (self.size, self.color, self.shape))

    def matches(self, s: Shape) -> bool:
        return all(v is None or v == getattr(s, f) for f, v in
                   (("size", self.size), ("color", self.color), ("shape", self.shape)))

    def select(self, scene: Scene) -> list[Shape]:
        return [s for s in scene.shapes if self.matches(s)]

    @classmethod
    def parse(cls, text: str) -> "Noun":
        """Singular or plural noun phrase -> Noun; ValueError naming the text otherwise."""
        words = text.strip().lower().split()
        if words and words[-1].endswith("s") and words[-1][:-1] in SHAPES + ("shape",):
            words[-1] = words[-1][:-1]
        fields = {}
        if words and words[-1] in SHAPES + ("shape",):
            head = words.pop()
            fields["shape"] = None if head == "shape" else head
            if words and words[-1] in COLORS:
                fields["color"] = words.pop()
            if words and words[-1] in SIZES:
                fields["size"] = words.pop()
        if not fields or words:
            raise ValueError(f"not a ShapesVQA noun phrase: {text!r}; expected [size] [colour] "
                             f"(one of {SHAPES} or 'shape')")
        return cls(**fields)


ALL_NOUNS = tuple(Noun(sz, c, sh) for sz in (None,) + tuple(SIZES) for c in (None,) + tuple(COLORS)
                  for sh in (None,) + SHAPES)


@dataclasses.dataclass
class Example:
    example_id: str
    image: np.ndarray
    question: str
    answers: list[str]
    family: str
    program: str
    scene: Scene | None = None


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _pick_noun(rng: np.random.Generator, nouns: list[Noun]) -> Noun:
    """Uniform over the number of attributes first, so short and long phrases both appear."""
    groups = sorted({n.num_attributes for n in nouns})
    size = _pick(rng, groups)
    return _pick(rng, [n for n in nouns if n.num_attributes == size])


def _article(noun: Noun) -> str:
    return "an" if noun.text[0] in "aeiou" else "a"


def _subnouns(s: Shape, exclude: tuple = ()) -> list[Noun]:
    """Every noun built from a subset of the shape's attributes, leaving out `exclude`."""
    out = []
    for keep in itertools.product((False, True), repeat=3):
        fields = {f: getattr(s, f) if k else None for f, k in zip(("size", "color", "shape"), keep)}
        if not any(fields[f] is not None for f in exclude):
            out.append(Noun(**fields))
    return out


def _unique_nouns(scene: Scene, s: Shape, exclude: tuple = ()) -> list[Noun]:
    return [n for n in _subnouns(s, exclude) if n.select(scene) == [s]]


def _coord(scene: Scene, s: Shape, axis: str) -> float:
    return s.cx if axis == "x" else s.cy


def _margin(scene: Scene, a: Shape, b: Shape, axis: str) -> float:
    scale = min(scene.width, scene.height) / (scene.width if axis == "x" else scene.height)
    return SEPARATION + 0.25 * (a.r + b.r) * scale


def extreme_shape(scene: Scene, shapes: list[Shape], direction: str) -> Shape | None:
    """The shape furthest in `direction`, or None when the runner-up is within the margin."""
    axis = "x" if direction in ("left", "right") else "y"
    sign = 1.0 if direction in ("right", "bottom") else -1.0
    ranked = sorted(shapes, key=lambda s: -sign * _coord(scene, s, axis))
    if len(ranked) < 2:
        return None
    best, second = ranked[0], ranked[1]
    gap = sign * (_coord(scene, best, axis) - _coord(scene, second, axis))
    return best if gap >= _margin(scene, best, second, axis) else None


def _find_one(noun: Noun) -> list[str]:
    return [f'{noun.var}_patches = image_patch.find("{noun.text}")',
            f"{noun.var}_patch = {noun.var}_patches[0]"]


def _find_extreme(noun: Noun, direction: str) -> tuple[list[str], str]:
    func, attr, name = _EXTREME_CODE[direction]
    return ([f'{noun.var}_patches = image_patch.find("{noun.text}")',
             f"{name} = {func}({noun.var}_patches, key=lambda patch: patch.{attr})"], name)


def _count(rng, scene):
    by_count: dict[int, list[Noun]] = {}
    for noun in ALL_NOUNS:
        by_count.setdefault(len(noun.select(scene)), []).append(noun)
    # Uniform over the counts this scene can give, so answers cover 0..N rather than piling on 0.
    noun = _pick_noun(rng, by_count[_pick(rng, sorted(by_count))])
    body = [f'{noun.var}_patches = image_patch.find("{noun.text}")',
            f"return str(len({noun.var}_patches))"]
    return f"How many {noun.plural} are there?", str(len(noun.select(scene))), body


def _exist(rng, scene):
    if rng.random() < 0.5:
        nouns = [n for n in _subnouns(_pick(rng, scene.shapes)) if n.num_attributes > 0]
    else:
        nouns = [n for n in ALL_NOUNS if n.num_attributes > 0 and not n.select(scene)]
    if not nouns:
        return None
    noun = _pick_noun(rng, nouns)
    answer = "yes" if noun.select(scene) else "no"
    body = [f'return "yes" if image_patch.exists("{noun.text}") else "no"']
    return f"Is there {_article(noun)} {noun.text}?", answer, body


def _attribute(rng, scene):
    for i in rng.permutation(len(scene.shapes)):
        target = scene.shapes[int(i)]
        for attr in rng.permutation(("color", "shape", "size")):
            nouns = _unique_nouns(scene, target, exclude=(str(attr),))
            if nouns:
                noun = _pick_noun(rng, nouns)
                query = f'return {noun.var}_patch.simple_query("what {attr} is this?")'
                body = _find_one(noun) + [query]
                return f"What {attr} is the {noun.text}?", getattr(target, str(attr)), body
    return None


def _spatial(rng, scene):
    unique = {s.id: _unique_nouns(scene, s) for s in scene.shapes}
    options = []
    for a, b in itertools.permutations([s for s in scene.shapes if unique[s.id]], 2):
        for axis in ("x", "y"):
            if abs(_coord(scene, a, axis) - _coord(scene, b, axis)) >= _margin(scene, a, b, axis):
                options.append((a, b, axis))
    if not options:
        return None
    a, b, axis = _pick(rng, options)
    na, nb = _pick_noun(rng, unique[a.id]), _pick_noun(rng, unique[b.id])
    idx = int(rng.integers(2)) + (0 if axis == "x" else 2)
    rel = SPATIAL_RELATIONS[idx]
    center = "horizontal_center" if axis == "x" else "vertical_center"
    op = "<" if idx % 2 == 0 else ">"
    holds = (_coord(scene, a, axis) < _coord(scene, b, axis)) == (op == "<")
    flag = ("is_left", "is_right", "is_above", "is_below")[idx]
    body = (_find_one(na) + _find_one(nb)
            + [f"{flag} = {na.var}_patch.{center} {op} {nb.var}_patch.{center}",
               f'return "yes" if {flag} else "no"'])
    return f"Is the {na.text} {rel} the {nb.text}?", "yes" if holds else "no", body


def _compare(rng, scene):
    levels = (("color",), ("shape",), ("size",), ("color", "shape"))
    values = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
    by_answer: dict[str, list[tuple[Noun, Noun]]] = {"yes": [], "no": []}
    for level in levels:
        combos = itertools.product(*(values[f] for f in level))
        nouns = [Noun(**dict(zip(level, combo))) for combo in combos]
        counts = {n: len(n.select(scene)) for n in nouns}
        for a, b in itertools.permutations(nouns, 2):
            if counts[a] or counts[b]:  # 0 vs 0 says nothing about the image
                by_answer["yes" if counts[a] > counts[b] else "no"].append((a, b))
    answer = "yes" if rng.random() < 0.5 else "no"
    if not by_answer[answer]:
        answer = "no" if answer == "yes" else "yes"
    if not by_answer[answer]:
        return None
    pairs = by_answer[answer]
    level = _pick(rng, sorted({a.num_attributes for a, _ in pairs}))
    a, b = _pick(rng, [p for p in pairs if p[0].num_attributes == level])
    body = [f'{a.var}_count = image_patch.count("{a.text}")',
            f'{b.var}_count = image_patch.count("{b.text}")',
            f'return "yes" if {a.var}_count > {b.var}_count else "no"']
    return f"Are there more {a.plural} than {b.plural}?", answer, body


def _extreme_options(scene, nouns):
    options = []
    for noun in nouns:
        selected = noun.select(scene)
        for direction in DIRECTIONS:
            best = extreme_shape(scene, selected, direction)
            if best is not None:
                options.append((noun, direction, best))
    return options


def _pick_option(rng, options):
    noun = _pick_noun(rng, [o[0] for o in options])
    return _pick(rng, [o for o in options if o[0] == noun])


def _extreme(rng, scene):
    for attr in rng.permutation(("color", "shape")):
        attr = str(attr)
        options = _extreme_options(scene, [n for n in ALL_NOUNS if getattr(n, attr) is None])
        if options:
            noun, direction, best = _pick_option(rng, options)
            lines, name = _find_extreme(noun, direction)
            body = lines + [f'return {name}.simple_query("what {attr} is this?")']
            question = f"What {attr} is the {noun.text} furthest to the {direction}?"
            return question, getattr(best, attr), body
    return None


def _knowledge(rng, scene):
    relation = _pick(rng, RELATIONS)
    # A referent naming both colour and shape would make finding it pointless.
    usable = [n for n in ALL_NOUNS if n.color is None or n.shape is None]
    usable_set = set(usable)
    direct = [(n, s) for s in scene.shapes for n in _unique_nouns(scene, s) if n in usable_set]
    extreme = _extreme_options(scene, usable)
    forms = [f for f, opts in (("direct", direct), ("extreme", extreme)) if opts]
    if not forms:
        return None
    if _pick(rng, forms) == "direct":
        noun = _pick_noun(rng, [n for n, _ in direct])
        target = next(s for n, s in direct if n == noun)
        lines, name, referent = _find_one(noun), f"{noun.var}_patch", noun.text
    else:
        noun, direction, target = _pick_option(rng, extreme)
        lines, name = _find_extreme(noun, direction)
        referent = f"{noun.text} furthest to the {direction}"
    if noun.color is None:
        lines.append(f'color = {name}.simple_query("what color is this?")')
    if noun.shape is None:
        lines.append(f'shape = {name}.simple_query("what shape is this?")')
    color = "{color}" if noun.color is None else noun.color
    shape = "{shape}" if noun.shape is None else noun.shape
    entity = f"{color} {shape}"
    lines.append(f'return knowledge_query(f"{entity}", "{relation}")')
    answer = lookup(f"{target.color} {target.shape}", relation)
    return _KNOWLEDGE_TEMPLATES[relation].format(referent), answer, lines


_POSERS = {"count": _count, "exist": _exist, "attribute": _attribute, "spatial": _spatial,
           "compare": _compare, "extreme": _extreme, "knowledge": _knowledge}


def make_program(body: list[str]) -> str:
    """Wrap body lines (already indented relative to the function body) into execute_command."""
    lines = ["def execute_command(image):", "    image_patch = ImagePatch(image)"]
    return "\n".join(lines + ["    " + line for line in body]) + "\n"


def pose_question(rng: np.random.Generator, scene: Scene, family: str) -> tuple[str, str, str] | None:
    """(question, answer, program) of `family` for the scene, or None when it cannot be well posed."""
    if family not in _POSERS:
        raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")
    posed = _POSERS[family](rng, scene)
    if posed is None:
        return None
    question, answer, body = posed
    return question, answer, make_program(body)


def family_turn(seed: int, index: int, families, known: tuple, kind: str = "question") -> str:
    """The family of example `index` (families take turns by index) after checking the arguments:
    `families` a non-empty subset of `known` (None: all of them), seed and index non-negative."""
    families = known if families is None else tuple(families)
    unknown = [f for f in families if f not in known]
    if unknown or not families:
        raise ValueError(f"unknown {kind} families {unknown} in {families}; expected a non-empty "
                         f"subset of {known}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return families[index % len(families)]


def generate_example(seed: int, index: int, scene_config: SceneConfig | None = None,
                     families=None) -> Example:
    """One example, deterministic in (seed, index); families take turns by index."""
    family = family_turn(seed, index, families, FAMILIES)
    rng = np.random.default_rng([seed, index])
    config = scene_config or SceneConfig()
    for _ in range(100):
        scene = generate_scene(rng, config)
        posed = pose_question(rng, scene, family)
        if posed is not None:
            question, answer, program = posed
            return Example(f"shapes-{seed}-{index:07d}", render(scene), question, [answer], family,
                           program, scene)
    raise RuntimeError(f"no well-posed {family!r} question in 100 scenes from {config}; "
                       f"allow more shapes (max_shapes={config.max_shapes})")


def generate_examples(seed: int, num: int, scene_config: SceneConfig | None = None,
                      families=None) -> list[Example]:
    """Examples 0..num-1 of `seed`; each family gets num / len(families) of them."""
    return [generate_example(seed, i, scene_config, families) for i in range(num)]
