"""Identity parameters of the procedural synthetic faces (see :mod:`data.synthetic`).

An *identity* is a plain dict of JSON-friendly numbers: a few categorical attributes (face shape,
skin tone, hair style and colour, eye colour, brow shape, nose shape, lip colour, facial hair,
glasses) and continuous geometry. Categorical attributes carry the large-scale cues a small CNN can
learn; :func:`sample_identities` rejects a new identity that differs from an earlier one in fewer
than ``min_differences`` categorical attributes, so identities are well separated.

Per-image variation of an identity ("expression" plus a little geometric jitter) comes from
:func:`jitter_identity`. Geometry is in *head units*: the head ellipsoid has half-height 1, and
features are placed at normalised surface coordinates (xn, yn) in [-1, 1] (x right, y up).
Colours are RGB floats in 0..255.
"""
import numpy as np

# --- palettes ------------------------------------------------------------------------------------
SKIN_TONES = (
    (255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 90),
    (160, 100, 62), (118, 72, 42), (82, 50, 32), (236, 188, 180),
)
HAIR_COLOURS = (
    (20, 16, 14), (58, 38, 24), (105, 68, 38), (150, 70, 30), (196, 110, 50),
    (225, 190, 120), (240, 230, 200), (140, 140, 140), (235, 235, 235),
    (40, 60, 150), (190, 60, 140), (50, 140, 80),
)
EYE_COLOURS = ((70, 40, 20), (25, 18, 12), (60, 120, 200), (70, 140, 80), (120, 130, 140), (140, 100, 40))
LIP_COLOURS = ((190, 90, 90), (150, 70, 70), (210, 60, 80), (120, 50, 60), (200, 120, 110), (150, 40, 110))
FRAME_COLOURS = ((15, 15, 15), (130, 80, 30), (200, 170, 60), (170, 30, 30), (40, 60, 160), (210, 210, 215))

FACE_SHAPES = ("oval", "round", "square", "heart", "long")
HAIR_STYLES = ("bald", "buzz", "short", "side_part", "fringe", "bob", "long", "afro", "bun", "mohawk",
               "receding")
BROW_SHAPES = ("straight", "arched", "angled", "bushy")
NOSE_SHAPES = ("narrow", "wide", "hooked", "button")
FACIAL_HAIR = ("none", "moustache", "goatee", "beard", "stubble")
GLASSES = ("none", "round", "rect", "sun")

#: Categorical attributes, used for the separation test of :func:`sample_identities`.
CATEGORICAL = ("face_shape", "skin_index", "hair_style", "hair_colour_index", "eye_colour_index",
               "brow_shape", "nose_shape", "lip_colour_index", "facial_hair", "glasses")

# (aspect a/b, depth c/b, jaw taper 0..1, chin flat-cut level in yn)
_FACE_GEOMETRY = {
    "oval": (0.74, 0.80, 0.30, -1.00),
    "round": (0.86, 0.82, 0.05, -1.00),
    "square": (0.84, 0.80, 0.00, -0.84),
    "heart": (0.80, 0.80, 0.60, -1.00),
    "long": (0.66, 0.78, 0.25, -0.95),
}


def _choice(rng, n, p=None):
    return int(rng.choice(n, p=p))


def _colour(base, rng, spread):
    return [float(np.clip(c + rng.normal(0.0, spread), 0, 255)) for c in base]


def sample_identity(rng):
    """Draw one identity's fixed parameters from ``rng`` (numpy Generator). Returns a dict."""
    face_shape = FACE_SHAPES[_choice(rng, len(FACE_SHAPES))]
    aspect, depth, taper, chin_cut = _FACE_GEOMETRY[face_shape]
    skin_index = _choice(rng, len(SKIN_TONES))
    hair_style = HAIR_STYLES[_choice(rng, len(HAIR_STYLES))]
    hair_colour_index = _choice(rng, len(HAIR_COLOURS))
    eye_colour_index = _choice(rng, len(EYE_COLOURS))
    brow_shape = BROW_SHAPES[_choice(rng, len(BROW_SHAPES))]
    nose_shape = NOSE_SHAPES[_choice(rng, len(NOSE_SHAPES))]
    lip_colour_index = _choice(rng, len(LIP_COLOURS))
    facial_hair = FACIAL_HAIR[_choice(rng, len(FACIAL_HAIR), p=(0.4, 0.15, 0.15, 0.15, 0.15))]
    glasses = GLASSES[_choice(rng, len(GLASSES), p=(0.55, 0.15, 0.15, 0.15))]
    hair = _colour(HAIR_COLOURS[hair_colour_index], rng, 8)
    brow_dark = float(rng.uniform(0.45, 0.9))
    nose_w = {"narrow": 0.10, "wide": 0.19, "hooked": 0.13, "button": 0.12}[nose_shape]
    nose_p = {"narrow": 0.30, "wide": 0.25, "hooked": 0.38, "button": 0.16}[nose_shape]
    return {
        "version": 1,
        "face_shape": face_shape,
        "aspect": aspect * float(rng.uniform(0.95, 1.05)),
        "depth": depth * float(rng.uniform(0.95, 1.05)),
        "taper": float(np.clip(taper + rng.uniform(-0.08, 0.08), 0.0, 0.8)),
        "chin_cut": chin_cut,
        "skin_index": skin_index,
        "skin": _colour(SKIN_TONES[skin_index], rng, 6),
        "cheek_blush": float(rng.uniform(0.0, 0.35)),
        "hair_style": hair_style,
        "hair_colour_index": hair_colour_index,
        "hair": hair,
        "hairline": float(rng.uniform(0.45, 0.62)),
        "hair_volume": float(rng.uniform(0.05, 0.12)),
        "hair_length": float(rng.uniform(0.9, 1.6)),
        "parting": float(rng.choice((-1.0, 1.0)) * rng.uniform(0.15, 0.35)),
        "eye_colour_index": eye_colour_index,
        "iris": _colour(EYE_COLOURS[eye_colour_index], rng, 6),
        "eye_y": float(rng.uniform(0.02, 0.16)),
        "eye_sep": float(rng.uniform(0.30, 0.44)),
        "eye_w": float(rng.uniform(0.13, 0.19)),
        "eye_h": float(rng.uniform(0.055, 0.085)),
        "eye_tilt": float(rng.uniform(-0.25, 0.25)),
        "brow_shape": brow_shape,
        "brow_gap": float(rng.uniform(0.10, 0.18)),
        "brow_thick": float(rng.uniform(0.025, 0.05) * (1.8 if brow_shape == "bushy" else 1.0)),
        "brow_colour": [c * brow_dark for c in hair],
        "brow_tilt": float(rng.uniform(-0.15, 0.15)),
        "nose_shape": nose_shape,
        "nose_w": nose_w * float(rng.uniform(0.9, 1.1)),
        "nose_protrusion": nose_p * float(rng.uniform(0.9, 1.1)),
        "nose_y": float(rng.uniform(-0.32, -0.22)),
        "mouth_y": float(rng.uniform(-0.60, -0.50)),
        "mouth_w": float(rng.uniform(0.20, 0.34)),
        "lip_thick": float(rng.uniform(0.025, 0.06)),
        "lip_colour_index": lip_colour_index,
        "lips": _colour(LIP_COLOURS[lip_colour_index], rng, 6),
        "facial_hair": facial_hair,
        "beard_colour": [c * float(rng.uniform(0.8, 1.0)) for c in hair],
        "glasses": glasses,
        "frame": _colour(FRAME_COLOURS[_choice(rng, len(FRAME_COLOURS))], rng, 5),
        "frame_thick": float(rng.uniform(0.015, 0.035)),
        "lens_size": float(rng.uniform(0.15, 0.21)),
        "ear_size": float(rng.uniform(0.16, 0.26)),
        "ear_out": float(rng.uniform(0.05, 0.18)),
        "mole": [float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.6, 0.0))] if rng.random() < 0.3 else None,
    }


def categorical_code(identity):
    """Integer code vector [len(CATEGORICAL)] of an identity's categorical attributes."""
    lookup = {"face_shape": FACE_SHAPES, "hair_style": HAIR_STYLES, "brow_shape": BROW_SHAPES,
              "nose_shape": NOSE_SHAPES, "facial_hair": FACIAL_HAIR, "glasses": GLASSES}
    code = []
    for key in CATEGORICAL:
        value = identity[key]
        code.append(lookup[key].index(value) if key in lookup else int(value))
    return np.asarray(code, dtype=np.int16)


def sample_identities(num_identities, seed, min_differences=4, max_tries=200):
    """Draw ``num_identities`` identities, each differing from all earlier ones in at least
    ``min_differences`` categorical attributes (rejection sampling; deterministic for ``seed``).

    Identity i is drawn from ``np.random.default_rng([seed, 0, i, attempt])``, so the first k
    identities do not depend on how many are requested. Returns a list of dicts.
    """
    identities, codes = [], np.zeros((0, len(CATEGORICAL)), dtype=np.int16)
    for i in range(int(num_identities)):
        for attempt in range(max_tries):
            params = sample_identity(np.random.default_rng([seed, 0, i, attempt]))
            code = categorical_code(params)
            if codes.shape[0] == 0 or np.min(np.sum(codes != code, axis=1)) >= min_differences:
                break
        else:
            raise ValueError(
                f"could not draw identity {i} differing from all others in >= {min_differences} "
                f"attributes after {max_tries} tries; lower min_differences or the identity count")
        identities.append(params)
        codes = np.concatenate([codes, code[None]], axis=0)
    return identities


def jitter_identity(identity, rng, amount=1.0):
    """Per-image variant of ``identity``: small geometric jitter plus an expression.

    Adds keys ``smile`` (-0.3..1), ``mouth_open`` (0..1), ``brow_raise`` (-1..1), ``blink`` (bool)
    and ``gaze`` ([dx, dy] in eye widths). ``amount`` scales the jitter (0 = neutral face).
    """
    p = dict(identity)
    for key, rel in (("eye_sep", 0.03), ("eye_w", 0.05), ("mouth_w", 0.05), ("nose_w", 0.05),
                     ("hair_volume", 0.1), ("aspect", 0.015)):
        p[key] = identity[key] * (1.0 + amount * rel * float(rng.uniform(-1, 1)))
    p["smile"] = amount * float(rng.uniform(-0.3, 1.0))
    p["mouth_open"] = amount * float(rng.uniform(0, 1) ** 2)
    p["brow_raise"] = amount * float(rng.uniform(-1, 1))
    p["blink"] = bool(rng.random() < 0.08 * amount)
    p["gaze"] = [amount * float(rng.uniform(-0.2, 0.2)), amount * float(rng.uniform(-0.15, 0.15))]
    return p
