"""The closed vocabulary of the world: colours, backgrounds, shapes, sizes, positions, relations.

Every number here is part of the world's specification (``docs/world.md``); change one and the
documentation, the renders and the scorer all change with it.
"""

from __future__ import annotations

# Object colours, exact RGB. Chosen far apart: the closest pair (red/orange) is 107 apart in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 30),
    "green": (25, 170, 45),
    "blue": (30, 60, 230),
    "yellow": (245, 230, 30),
    "purple": (145, 35, 180),
    "orange": (250, 125, 0),
    "cyan": (30, 205, 215),
}

# Background colours, exact RGB; none is within 108 of an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "white": (250, 250, 250),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Side of the object's (square) bounding box in pixels of a 32-px canvas; scales with the canvas.
SIZES: dict[str, int] = {"small": 7, "large": 13}

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")

# Caption phrase of each position.
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Geometry constants, in pixels of the 32-px reference canvas.
REF_SIZE = 32  # the reference canvas; object centres lie on its pixel centres
EDGE_MARGIN = 1  # background pixels kept between any object's bounding box and the canvas edge
OBJECT_GAP = 3  # background pixels kept between the bounding boxes of two objects (one axis)
CENTRE_HALF = 4  # "centre" holds when both |x - 16| and |y - 16| are at most this
SAMPLE_SLACK = 2  # the sampler keeps every stated relation / position this far from its boundary

# Probability of 1, 2, 3 objects when ``n_objects`` is None.
N_OBJECTS_WEIGHTS: dict[int, float] = {1: 0.3, 2: 0.4, 3: 0.3}
# Probability that a caption names the background.
P_MENTION_BACKGROUND = 0.5
