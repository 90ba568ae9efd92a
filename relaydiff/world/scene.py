"""Scene records (objects, relations, prompt specs) and the geometric meaning of every phrase."""

from __future__ import annotations

from dataclasses import dataclass, field

from relaydiff.world.vocab import (
    BACKGROUNDS,
    CENTRE_HALF,
    PALETTE,
    POSITION_PHRASES,
    POSITIONS,
    REF_SIZE,
    RELATIONS,
    SHAPES,
    SIZES,
)

MAX_OBJECTS = 3


@dataclass(frozen=True)
class ObjSpec:
    """What a prompt asks of one object: shape, colour and size words."""

    shape: str  # one of SHAPES
    colour: str  # one of PALETTE
    size: str  # one of SIZES

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; known: {tuple(PALETTE)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {tuple(SIZES)}")

    def phrase(self) -> str:
        """The noun phrase, e.g. ``"a small red circle"``."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Obj:
    """One drawn object. ``cx``/``cy`` are the bounding-box centre as fractions of the canvas
    width/height (x to the right, y downwards), so a scene renders at any canvas size."""

    shape: str  # one of SHAPES
    colour: str  # one of PALETTE
    size: str  # one of SIZES
    cx: float  # centre x in [0, 1]
    cy: float  # centre y in [0, 1]

    def __post_init__(self) -> None:
        ObjSpec(self.shape, self.colour, self.size)  # validates the words
        for name, v in (("cx", self.cx), ("cy", self.cy)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")

    @property
    def spec(self) -> ObjSpec:
        return ObjSpec(self.shape, self.colour, self.size)

    @property
    def extent(self) -> float:
        """Bounding-box side as a fraction of the canvas."""
        return SIZES[self.size] / REF_SIZE


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` <relation> ``objects[anchor]``, e.g. (0, "left of", 1)."""

    subject: int  # index into the scene's objects
    relation: str  # one of RELATIONS
    anchor: int  # index into the scene's objects

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; known: {RELATIONS}")
        if self.subject == self.anchor:
            raise ValueError(f"a relation needs two objects, got subject=anchor={self.subject!r}")


def _check_structure(
    n: int, position: str | None, relations: tuple[Relation, ...], keys: list[tuple[str, str]]
) -> None:
    """Raise ValueError unless (position, relations) is a structure the grammar can say."""
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {n!r}")
    if len(set(keys)) != n:
        raise ValueError(f"objects in one scene must differ in (colour, shape), got {keys!r}")
    if n == 1:
        if position not in POSITIONS:
            raise ValueError(f"a 1-object scene needs a position in {POSITIONS}, got {position!r}")
        if relations:
            raise ValueError(f"a 1-object scene has no relations, got {relations!r}")
        return
    if position is not None:
        raise ValueError(f"only 1-object scenes have a position, got {position!r}")
    want = [(0, 1)] if n == 2 else [(0, 1), (2, 1)]
    got = [(r.subject, r.anchor) for r in relations]
    if got != want:
        raise ValueError(
            f"a {n}-object scene needs relations on (subject, anchor) pairs {want}, got {got!r}"
        )


@dataclass(frozen=True)
class PromptSpec:
    """Everything a caption asks for; ``background`` is None when the caption does not name it."""

    objects: tuple[ObjSpec, ...]
    background: str | None
    position: str | None  # 1-object prompts only
    relations: tuple[Relation, ...] = ()

    def __post_init__(self) -> None:
        _check_structure(
            len(self.objects),
            self.position,
            self.relations,
            [(o.colour, o.shape) for o in self.objects],
        )
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; known: {tuple(BACKGROUNDS)}"
            )

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def complexity(self) -> int:
        """Attributes the prompt specifies: 3 per object (shape, colour, size), plus the
        position, each relation, and the background when named."""
        return (
            3 * len(self.objects)
            + (self.position is not None)
            + len(self.relations)
            + (self.background is not None)
        )

    def caption(self) -> str:
        """The caption of this spec in the world grammar (see ``docs/world.md``)."""
        o = self.objects
        if len(o) == 1:
            assert self.position is not None
            text = f"{o[0].phrase()} {POSITION_PHRASES[self.position]}"
        else:
            text = f"{o[0].phrase()} {self.relations[0].relation} {o[1].phrase()}"
            if len(o) == 3:
                text += f" and {o[2].phrase()} {self.relations[1].relation} it"
        if self.background is not None:
            text += f" on a {self.background} background"
        return text


@dataclass(frozen=True)
class Scene:
    """A drawable scene: objects, background, and what its caption states about the layout."""

    objects: tuple[Obj, ...]
    background: str  # one of BACKGROUNDS
    position: str | None  # 1-object scenes only
    relations: tuple[Relation, ...] = ()
    mention_background: bool = field(default=True)  # does the caption name the background?

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; known: {tuple(BACKGROUNDS)}"
            )
        _check_structure(
            len(self.objects),
            self.position,
            self.relations,
            [(o.colour, o.shape) for o in self.objects],
        )

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def complexity(self) -> int:
        return self.spec().complexity

    def spec(self) -> PromptSpec:
        """What the caption of this scene asks for."""
        return PromptSpec(
            objects=tuple(o.spec for o in self.objects),
            background=self.background if self.mention_background else None,
            position=self.position,
            relations=self.relations,
        )

    def caption(self) -> str:
        return self.spec().caption()


# --- geometric meaning -------------------------------------------------------------------------
# All predicates take centres as canvas fractions (x right, y down); see docs/world.md.


def position_holds(position: str, cx: float, cy: float) -> bool:
    """Does a centre at (cx, cy) lie in the region named ``position``?"""
    u, v = cx - 0.5, cy - 0.5
    c = CENTRE_HALF / REF_SIZE
    if position == "centre":
        return max(abs(u), abs(v)) <= c
    if position == "left":
        return -u > c and -u > abs(v)
    if position == "right":
        return u > c and u > abs(v)
    if position == "top":
        return -v > c and -v > abs(u)
    if position == "bottom":
        return v > c and v > abs(u)
    raise ValueError(f"unknown position {position!r}; known: {POSITIONS}")


def relation_holds(
    relation: str, subject: tuple[float, float], anchor: tuple[float, float]
) -> bool:
    """Does ``subject`` (cx, cy) stand in ``relation`` to ``anchor`` (cx, cy)?

    "A left of B" holds when B lies in the 90-degree wedge to the right of A:
    ``xB - xA > |yB - yA|``; the other relations are the same wedge rotated.
    """
    dx = anchor[0] - subject[0]
    dy = anchor[1] - subject[1]
    if relation == "left of":
        return dx > abs(dy)
    if relation == "right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")
