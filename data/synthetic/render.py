"""Render one procedural face image from identity parameters plus random nuisances (NumPy + OpenCV).

Model: the head is an ellipsoid (semi-axes ``aspect``, 1, ``depth`` in head units) rotated by a 3-D
pose (yaw, pitch, roll) and projected orthographically. The head, its hair cap, beard and a larger
"hair shell" ellipsoid are ray-cast per pixel (front intersection of the rotated quadric), so the
hairline, jaw taper and shading follow the surface exactly. Small features (eyes, brows, nose,
mouth, glasses, ears, moustache, mole) are 2-D outlines in normalised surface coordinates (xn, yn)
*lifted* onto the ellipsoid, rotated and projected, then filled with OpenCV in painter's order, so
they foreshorten with pose. Shading is Lambertian: ``ambient + diffuse * max(n . l, 0)``.

Nuisances drawn per image (all scaled by ``difficulty``, 1.0 = default): pose (yaw +-35, pitch +-20,
roll +-15 degrees), expression (smile, open mouth, brow raise, blink, gaze), head scale and position
(crop jitter), light direction / colour / ambient level, background clutter, clothing colour,
occluders (bar, blob, hand-like patch), colour/contrast/gamma jitter, Gaussian blur and noise.
JPEG quality is drawn by :func:`render_jpeg`.
"""
import math

import cv2
import numpy as np

from data.synthetic.params import jitter_identity

_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT
_CIRCLE = np.linspace(0.0, 2.0 * np.pi, 17)[:-1]


def rotation_matrix(yaw, pitch, roll):
    """Camera-from-head rotation [3, 3] for angles in radians (x right, y up, z to the viewer)."""
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


class _Scene:
    """Pose, projection and lighting of one image; helpers to lift, project and shade."""

    def __init__(self, p, rng, size, difficulty):
        d = difficulty
        self.p = p
        self.size = size
        self.axes = np.array([p["aspect"], 1.0, p["depth"]])
        yaw = math.radians(35.0 * d) * rng.uniform(-1, 1)
        pitch = math.radians(20.0 * d) * rng.uniform(-1, 1)
        roll = math.radians(15.0 * d) * rng.uniform(-1, 1)
        self.R = rotation_matrix(yaw, pitch, roll)
        self.scale = size * 0.32 * (1.0 + 0.10 * d * rng.uniform(-1, 1))  # pixels per head unit
        self.cx = size * (0.5 + 0.06 * d * rng.uniform(-1, 1))
        self.cy = size * (0.47 + 0.05 * d * rng.uniform(-1, 1))
        light = np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 1.0), rng.uniform(0.35, 1.2)])
        self.light = light / np.linalg.norm(light)
        self.ambient = float(rng.uniform(0.55 - 0.15 * d, 0.65))
        self.diffuse = float(rng.uniform(0.45, 0.75))
        self.tint = 1.0 + 0.03 * d * rng.uniform(-1, 1, 3)
        self.gain = float(rng.uniform(1.0 - 0.12 * d, 1.0 + 0.1 * d))

    # geometry ------------------------------------------------------------------------------------
    def lift(self, xn, yn, dz=0.0):
        """Points on the head surface at normalised (xn, yn) -> head-frame xyz [N, 3]."""
        xn = np.asarray(xn, dtype=np.float64)
        yn = np.asarray(yn, dtype=np.float64)
        zn = np.sqrt(np.maximum(1.0 - xn * xn - yn * yn, 0.0)) + dz
        return np.stack([xn, yn, zn], axis=-1) * self.axes

    def normal(self, q):
        """Unit surface normal (camera frame) of the head ellipsoid at head-frame points [N, 3]."""
        n = (q / (self.axes ** 2)) @ self.R.T
        return n / np.sqrt(np.sum(n * n, axis=-1, keepdims=True))

    def project(self, q):
        """Head-frame points [N, 3] -> pixel coordinates [N, 2] (orthographic)."""
        c = q @ self.R.T
        return np.stack([self.cx + self.scale * c[:, 0], self.cy - self.scale * c[:, 1]], axis=-1)

    def shade(self, n_cam):
        """Lambertian intensity for unit camera-frame normal(s) [..., 3]."""
        return self.ambient + self.diffuse * np.maximum(n_cam @ self.light, 0.0)

    def colour(self, rgb, intensity):
        c = np.asarray(rgb, dtype=np.float64) * (float(intensity) * self.gain) * self.tint
        return tuple(min(255.0, max(0.0, float(v))) for v in c)

    # drawing --------------------------------------------------------------------------------------
    def fill(self, img, pts, rgb):
        cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], rgb, cv2.LINE_AA, _SHIFT)

    def line(self, img, pts, rgb, thickness_units, closed=False):
        t = max(1, int(round(thickness_units * self.scale)))
        cv2.polylines(img, [np.round(pts * _ONE).astype(np.int32)], closed, rgb, t, cv2.LINE_AA, _SHIFT)

    def surface_patch(self, img, xn, yn, rgb, dz=0.0, min_facing=0.08):
        """Fill the outline (xn, yn) lifted onto the head; skipped when it faces away.

        Lean version of lift -> project (this runs ~15 times per image): the facing test and the
        shade use the normal at the outline's mean point.
        """
        xn = np.asarray(xn, dtype=np.float64)
        yn = np.asarray(yn, dtype=np.float64)
        mx, my = float(xn.mean()), float(yn.mean())
        mz = math.sqrt(max(1.0 - mx * mx - my * my, 0.0)) + dz
        A, C, R = self.axes[0], self.axes[2], self.R
        n = R[:, 0] * (mx / A) + R[:, 1] * my + R[:, 2] * (mz / C)
        n = n / math.sqrt(float(n @ n))
        if n[2] < min_facing:
            return False
        zn = (np.sqrt(np.maximum(1.0 - xn * xn - yn * yn, 0.0)) + dz) * C
        xa = xn * A
        pts = np.empty((xn.size, 2))
        pts[:, 0] = self.cx + self.scale * (R[0, 0] * xa + R[0, 1] * yn + R[0, 2] * zn)
        pts[:, 1] = self.cy - self.scale * (R[1, 0] * xa + R[1, 1] * yn + R[1, 2] * zn)
        inten = self.ambient + self.diffuse * max(float(n @ self.light), 0.0)
        c = np.minimum(np.asarray(rgb, dtype=np.float64) * (inten * self.gain) * self.tint, 255)
        self.fill(img, pts, (c[0], c[1], c[2]))
        return True

    def bbox(self, axes, offset, margin=2):
        """Pixel box (x0, y0, x1, y1) holding the projection of a rotated ellipsoid, clipped."""
        o = self.R @ np.asarray(offset)
        cov = (self.R * np.asarray(axes) ** 2) @ self.R.T  # R diag(axes^2) R^T
        hx, hy = math.sqrt(cov[0, 0]) * self.scale, math.sqrt(cov[1, 1]) * self.scale
        ux, uy = self.cx + self.scale * o[0], self.cy - self.scale * o[1]
        return (max(0, int(ux - hx) - margin), max(0, int(uy - hy) - margin),
                min(self.size, int(ux + hx) + margin + 1), min(self.size, int(uy + hy) + margin + 1))

    def raycast(self, axes, offset):
        """Front intersection of a rotated ellipsoid with the pixel rays of its bounding box.

        Returns (box, hit mask [h, w], head-frame normalised coords xn, yn, zn each [h, w],
        Lambertian intensity [h, w]), or None when the box is empty.
        """
        box = self.bbox(axes, offset)
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return None
        o = self.R @ np.asarray(offset)
        f32 = np.float32
        X = ((np.arange(x0, x1, dtype=f32) + f32(0.5 - self.cx)) / f32(self.scale) - f32(o[0]))[None, :]
        Y = ((f32(self.cy) - (np.arange(y0, y1, dtype=f32) + f32(0.5))) / f32(self.scale) - f32(o[1]))[:, None]
        M = (self.R * (1.0 / np.asarray(axes) ** 2)) @ self.R.T
        m = [[f32(v) for v in row] for row in M]
        r = [[f32(v) for v in row] for row in self.R]
        a = M[2, 2]
        bh = m[0][2] * X + m[1][2] * Y  # b / 2
        c = (m[0][0] * X * X + m[1][1] * Y * Y - f32(1.0)) + f32(2.0) * m[0][1] * X * Y
        disc = bh * bh - f32(a) * c
        hit = disc > 0
        Z = (np.sqrt(np.maximum(disc, f32(0))) - bh) * f32(1.0 / a)
        ax = [f32(1.0 / v) for v in axes]
        xn = (r[0][0] * X + r[1][0] * Y + r[2][0] * Z) * ax[0]
        yn = (r[0][1] * X + r[1][1] * Y + r[2][1] * Z) * ax[1]
        zn = (r[0][2] * X + r[1][2] * Y + r[2][2] * Z) * ax[2]
        nx = m[0][0] * X + m[0][1] * Y + m[0][2] * Z
        ny = m[1][0] * X + m[1][1] * Y + m[1][2] * Z
        nz = m[2][0] * X + m[2][1] * Y + m[2][2] * Z
        lx, ly, lz = (f32(v) for v in self.light)
        ndl = (nx * lx + ny * ly + nz * lz) / (np.sqrt(nx * nx + ny * ny + nz * nz) + f32(1e-9))
        inten = f32(self.ambient) + f32(self.diffuse) * np.maximum(ndl, f32(0))
        return box, hit, xn, yn, zn, inten


# --- hair ----------------------------------------------------------------------------------------
def _hairline(p, xn, zn, shell=False):
    """Hairline height (yn) around the head; hair where yn > hairline. Arrays of the same shape."""
    style = p["hair_style"]
    cphi = zn / np.sqrt(xn * xn + zn * zn + np.float32(1e-6))  # cos of the angle around the vertical
    front_w = np.maximum(cphi, 0)
    back_w = np.maximum(-cphi, 0)
    front = p["hairline"]
    side = p["eye_y"] + 0.2
    back = -0.45
    if style == "fringe":
        front = p["eye_y"] + 0.24
    elif style == "receding":
        front = 0.72
    elif style in ("long", "bob"):
        side = p["eye_y"] - 0.05
    elif style == "afro":
        front = p["hairline"] - 0.05
    h = side + (front - side) * front_w + (back - side) * back_w
    if style == "side_part":
        h = h - 0.22 * front_w * np.clip(np.sign(p["parting"]) * xn * 4.0, 0, 1)
    if style == "receding":
        h = h + 0.25 * np.exp(-((np.arccos(np.clip(cphi, -1, 1)) - 0.55) / 0.25) ** 2)
    if style == "mohawk":
        h = np.where(np.abs(xn) < 0.2, h, 9.0)
    if shell:
        h = h - 0.04
    return h


_SHELL = {"short": 1.0, "side_part": 1.2, "fringe": 1.1, "bob": 1.6, "long": 1.4, "afro": 4.0,
          "bun": 0.8, "mohawk": 3.0, "receding": 0.8}


def _draw_back_hair(scene, img, p, rgb):
    """Long / bob hair hanging behind the head and neck (drawn before the neck and head)."""
    length = p["hair_length"] if p["hair_style"] == "long" else 0.72
    a = p["aspect"] * (1.0 + p["hair_volume"])
    t = np.linspace(0, 1, 8)
    left = np.stack([-a * (1.0 + 0.1 * t), 0.3 - (0.3 + length) * t], -1)
    right = left[::-1] * [-1, 1]
    bottom = np.stack([np.linspace(-a * 1.1, a * 1.1, 7), -length - 0.06 * np.sin(np.linspace(0, np.pi, 7))], -1)
    outline = np.concatenate([left, bottom[1:-1], right], 0)
    q = np.concatenate([outline, np.full((len(outline), 1), -0.25 * p["depth"])], 1)
    scene.fill(img, scene.project(q), scene.colour(rgb, scene.ambient + 0.5 * scene.diffuse))


def _draw_bun(scene, img, p, rgb):
    c = np.array([0.0, 0.85, -0.45 * p["depth"]])
    r = 0.32
    q = c + r * np.stack([np.cos(_CIRCLE), np.sin(_CIRCLE), np.zeros_like(_CIRCLE)], -1)
    pts = scene.project(q)
    scene.fill(img, pts, scene.colour(rgb, scene.ambient + 0.6 * scene.diffuse))


def _paint_layer(img, box, mask, intensity, albedo):
    """img[box][mask] = intensity * albedo; albedo is [3] or [h, w, 3] (RGB 0..255)."""
    x0, y0, x1, y1 = box
    col = np.minimum(intensity[..., None] * albedo, np.float32(255)).astype(np.uint8)
    np.copyto(img[y0:y1, x0:x1], col, where=mask[..., None])


def _draw_shell(scene, img, p, rgb):
    v = p["hair_volume"] * _SHELL[p["hair_style"]]
    axes = scene.axes * np.array([1.0 + v, 1.0 + 0.8 * v, 1.0 + v])
    cast = scene.raycast(axes, (0.0, 0.6 * v, 0.0))
    if cast is None:
        return
    box, hit, xn, yn, zn, inten = cast
    mask = hit & (yn > _hairline(p, xn, zn, shell=True))
    inten = inten * (1.0 + 0.07 * np.sin(np.float32(25.0) * xn))
    _paint_layer(img, box, mask, inten, np.asarray(rgb, np.float32) * (scene.tint * scene.gain).astype(np.float32))


def _draw_head(scene, img, p):
    cast = scene.raycast(scene.axes, (0.0, 0.0, 0.0))
    if cast is None:
        return
    box, hit, xn, yn, zn, inten = cast
    # jaw taper and flat chin: cut the sides of the lower face
    width = np.sqrt(np.clip(1.0 - yn * yn, 0, None)) * (1.0 - p["taper"] * np.clip(-yn, 0, None) ** 2)
    mask = hit & (np.abs(xn) <= width) & (yn >= p["chin_cut"])
    albedo = np.empty(xn.shape + (3,), np.float32)
    albedo[:] = np.asarray(p["skin"], np.float32)
    style = p["hair_style"]
    fh = p["facial_hair"]
    if fh in ("beard", "stubble", "goatee"):
        if fh == "goatee":
            beard = (yn < p["mouth_y"] + 0.03) & (np.abs(xn) < 0.26) & (zn > 0)
        else:
            top = p["mouth_y"] + 0.12 + 0.9 * np.clip(np.abs(xn) - 0.35, 0, None)
            beard = (yn < np.minimum(top, p["nose_y"] + 0.08)) & (zn > -0.3)
        alpha = 0.4 if fh == "stubble" else 1.0
        albedo[beard] = (1 - alpha) * albedo[beard] + alpha * np.asarray(p["beard_colour"], np.float32)
    if style != "bald":
        hair = yn > _hairline(p, xn, zn)
        alpha = 0.6 if style == "buzz" else 1.0
        albedo[hair] = (1 - alpha) * albedo[hair] + alpha * np.asarray(p["hair"], np.float32)
    albedo *= (scene.tint * scene.gain).astype(np.float32)
    _paint_layer(img, box, mask, inten, albedo)


def _draw_ear(scene, img, p, side):
    ax = p["aspect"]
    c = np.array([side * ax * 0.98, p["eye_y"] - 0.12, -0.08 * p["depth"]])
    back = np.array([side * (0.5 + 2.0 * p["ear_out"]), 0.0, -1.0])
    back /= np.linalg.norm(back)
    r = p["ear_size"]
    pts = (c + np.outer(r * np.sin(_CIRCLE), [0, 1, 0]) + np.outer(0.55 * r * (np.cos(_CIRCLE) + 0.6), back)
           + np.array([side * p["ear_out"] * r, 0, 0]))
    n = scene.R @ np.array([side, 0.0, p["ear_out"]])
    n /= np.linalg.norm(n)
    scene.fill(img, scene.project(pts), scene.colour(p["skin"], 0.9 * scene.shade(n)))


def _ear_faces_camera(scene, side):
    return (scene.R @ np.array([side, 0.0, 0.0]))[2] > -0.05


# --- facial features -----------------------------------------------------------------------------
def _draw_eyes(scene, img, p):
    ew, eh = p["eye_w"], p["eye_h"]
    for side in (-1, 1):
        ex, ey = side * p["eye_sep"], p["eye_y"]
        rot = side * p["eye_tilt"] * 0.5
        cs, sn = math.cos(rot), math.sin(rot)
        lx = ew * np.cos(_CIRCLE)
        ly = eh * np.sin(_CIRCLE) * np.where(np.sin(_CIRCLE) > 0, 1.0, 0.75)
        if p["blink"]:
            ly = ly * 0.12
        xs, ys = ex + cs * lx - sn * ly, ey + sn * lx + cs * ly
        white = (235, 232, 225) if not p["blink"] else tuple(0.8 * np.asarray(p["skin"]))
        if not scene.surface_patch(img, xs, ys, white):
            continue
        if not p["blink"]:
            gx, gy = p["gaze"]
            r = 0.85 * eh
            scene.surface_patch(img, ex + gx * ew + r * np.cos(_CIRCLE), ey + gy * eh + r * np.sin(_CIRCLE),
                                p["iris"], dz=0.005)
            scene.surface_patch(img, ex + gx * ew + 0.45 * r * np.cos(_CIRCLE),
                                ey + gy * eh + 0.45 * r * np.sin(_CIRCLE), (10, 10, 10), dz=0.01)
        upper = _CIRCLE[:9]
        lid = np.stack([ex + cs * ew * np.cos(upper) - sn * eh * np.sin(upper) * (0.12 if p["blink"] else 1),
                        ey + sn * ew * np.cos(upper) + cs * eh * np.sin(upper) * (0.12 if p["blink"] else 1)], -1)
        q = scene.lift(lid[:, 0], lid[:, 1], 0.01)
        scene.line(img, scene.project(q), scene.colour((30, 20, 20), 1.0), 0.018)


def _draw_brows(scene, img, p):
    t = np.linspace(0, 1, 9)
    shape = p["brow_shape"]
    if shape == "arched":
        prof = 0.05 * np.sin(np.pi * t)
    elif shape == "angled":
        prof = 0.06 * np.where(t < 0.65, t / 0.65, (1 - t) / 0.35)
    else:
        prof = 0.015 * np.sin(np.pi * t)
    th = p["brow_thick"] * (1.2 - 0.5 * t)
    for side in (-1, 1):
        ex = side * p["eye_sep"]
        xs = ex + side * (-0.9 + 2.0 * t) * p["eye_w"]
        yc = p["eye_y"] + p["brow_gap"] + 0.035 * p["brow_raise"] + prof + p["brow_tilt"] * (t - 0.5) * 0.2
        xo = np.concatenate([xs, xs[::-1]])
        yo = np.concatenate([yc + th / 2, (yc - th / 2)[::-1]])
        scene.surface_patch(img, xo, yo, p["brow_colour"], dz=0.004)


def _draw_nose(scene, img, p):
    w, ny = p["nose_w"], p["nose_y"]
    top = scene.lift(0.0, p["eye_y"] - 0.03)[None]
    base = scene.lift(0.0, ny + 0.03)
    drop = 0.06 if p["nose_shape"] == "hooked" else 0.0
    tip = (base + np.array([0.0, -drop, p["nose_protrusion"]]))[None]
    wings = scene.lift(np.array([-w, w]), np.array([ny, ny]), 0.02)
    bottom = scene.lift(0.0, ny - 0.04)[None]
    faces = [np.concatenate([top, tip, wings[:1]]), np.concatenate([top, tip, wings[1:]]),
             np.concatenate([wings[:1], tip, wings[1:], bottom])]
    cam = [f @ scene.R.T for f in faces]
    order = np.argsort([c[:, 2].mean() for c in cam])
    for k in order:
        c = cam[k]
        e1, e2 = c[1] - c[0], c[2] - c[0]
        n = np.array([e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2], e1[0] * e2[1] - e1[1] * e2[0]])
        n /= math.sqrt(float(n @ n)) + 1e-9
        if n[2] < 0:
            n = -n
        scene.fill(img, scene.project(faces[k]), scene.colour(p["skin"], 0.95 * scene.shade(n)))
    for side in (-1, 1):
        xs = side * 0.45 * w + 0.035 * w / 0.12 * np.cos(_CIRCLE)
        ys = ny - 0.005 + 0.015 * np.sin(_CIRCLE)
        scene.surface_patch(img, xs, ys, 0.35 * np.asarray(p["skin"]), dz=0.02, min_facing=0.3)


def _draw_mouth(scene, img, p):
    mw, my, lt = p["mouth_w"], p["mouth_y"], p["lip_thick"]
    x = np.linspace(-mw, mw, 11)
    u = (x / mw) ** 2
    c = 0.05 * p["smile"] * u
    o = 0.09 * p["mouth_open"]
    up_top = my + o / 2 + lt * (1 - u) + c
    up_bot = my + o / 2 * (1 - u) + c
    lo_top = my - o / 2 * (1 - u) + c
    lo_bot = my - o / 2 - 1.2 * lt * (1 - u) + c
    if p["facial_hair"] == "moustache" or p["facial_hair"] == "beard":
        mx = x * 1.2
        scene.surface_patch(img, np.concatenate([mx, mx[::-1]]),
                            np.concatenate([up_top + 0.085 - 0.05 * u, (up_top + 0.01 - 0.06 * u)[::-1]]),
                            p["beard_colour"], dz=0.01)
    if o > 0.01:
        scene.surface_patch(img, np.concatenate([x, x[::-1]]), np.concatenate([up_bot, lo_top[::-1]]),
                            (45, 15, 20), dz=0.002)
        scene.surface_patch(img, np.concatenate([x * 0.7, x[::-1] * 0.7]),
                            np.concatenate([up_bot, (up_bot - 0.3 * o)[::-1]]), (230, 225, 215), dz=0.003)
    scene.surface_patch(img, np.concatenate([x, x[::-1]]), np.concatenate([up_top, up_bot[::-1]]), p["lips"], 0.004)
    scene.surface_patch(img, np.concatenate([x, x[::-1]]), np.concatenate([lo_top, lo_bot[::-1]]), p["lips"], 0.004)


def _draw_glasses(scene, img, p):
    style = p["glasses"]
    r = p["lens_size"]
    if style == "rect":
        k = np.linspace(0, 2 * np.pi, 17)[:-1]
        lx = r * 1.1 * np.clip(1.6 * np.cos(k), -1, 1)
        ly = r * 0.75 * np.clip(1.6 * np.sin(k), -1, 1)
    else:
        lx, ly = r * np.cos(_CIRCLE), r * 0.9 * np.sin(_CIRCLE)
    frame = scene.colour(p["frame"], scene.ambient + 0.5 * scene.diffuse)
    inner = []
    for side in (-1, 1):
        ex, ey = side * p["eye_sep"], p["eye_y"]
        q = scene.lift(np.clip(ex + lx, -0.95, 0.95), ey + ly, 0.0)
        q[:, 2] += 0.12 * p["depth"]
        if scene.normal(scene.lift(ex, ey)[None])[0][2] < 0.1:
            continue
        pts = scene.project(q)
        if style == "sun":
            over = img.copy()
            scene.fill(over, pts, (20, 20, 25))
            cv2.addWeighted(over, 0.85, img, 0.15, 0, dst=img)
        scene.line(img, pts, frame, p["frame_thick"], closed=True)
        inner.append(pts[len(pts) // 2 if side > 0 else 0])
        if _ear_faces_camera(scene, side):
            outer = q[0] if side > 0 else q[len(q) // 2]
            ear = np.array([side * p["aspect"], p["eye_y"], -0.1 * p["depth"]])
            scene.line(img, scene.project(np.stack([outer, ear])), frame, p["frame_thick"])
    if len(inner) == 2:
        scene.line(img, np.stack(inner), frame, p["frame_thick"])


# --- background, body, occluders, post-processing -------------------------------------------------
def _background(rng, size, difficulty):
    k = int(rng.integers(2, 6))
    low = rng.integers(0, 256, (k, k, 3), dtype=np.uint8)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(2, 2 + int(round(6 * difficulty)) + 1))):
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        kind = rng.integers(0, 4)
        a, b = rng.uniform(-0.2, 1.2, 2) * size, rng.uniform(-0.2, 1.2, 2) * size
        if kind == 0:
            cv2.rectangle(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), col, -1)
        elif kind == 1:
            cv2.circle(img, (int(a[0]), int(a[1])), int(rng.uniform(0.03, 0.3) * size), col, -1)
        elif kind == 2:
            cv2.line(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), col, max(1, int(rng.uniform(0.01, 0.06) * size)))
        else:
            pts = rng.uniform(-0.1, 1.1, (int(rng.integers(3, 6)), 2)) * size
            cv2.fillPoly(img, [pts.astype(np.int32)], col)
    return img


def _draw_shoulders(scene, img, rng):
    """Shoulders in a random shirt colour (a per-image nuisance, not an identity cue)."""
    s, cx, cy = scene.scale, scene.cx, scene.cy
    shirt = tuple(float(v) for v in rng.uniform(0, 255, 3))
    yaw_shift = scene.R[0, 2] * 0.3 * s
    cv2.ellipse(img, (int(cx + yaw_shift), int(cy + 2.15 * s)), (int(1.9 * s), int(0.9 * s)), 0, 0, 360,
                scene.colour(shirt, 1.0), -1, cv2.LINE_AA)


def _draw_neck(scene, img, p):
    s, cy = scene.scale, scene.cy
    neck_w = 0.42 * p["aspect"]
    top = np.array([[-neck_w, -0.4, -0.2], [neck_w, -0.4, -0.2]])
    pts = scene.project(top)
    bottom = np.array([[pts[1, 0] + 0.05 * s, cy + 1.6 * s], [pts[0, 0] - 0.05 * s, cy + 1.6 * s]])
    scene.fill(img, np.concatenate([pts, bottom]), scene.colour(p["skin"], 0.8 * scene.ambient + 0.3 * scene.diffuse))


def _occlude(img, rng, scene, p):
    size = img.shape[0]
    s = scene.scale
    cx, cy = scene.cx + rng.uniform(-0.6, 0.6) * s, scene.cy + rng.uniform(-0.8, 0.6) * s
    kind = rng.integers(0, 3)
    if kind == 0:  # bar
        ang = rng.uniform(0, np.pi)
        d = np.array([math.cos(ang), math.sin(ang)]) * size
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, (int(cx - d[0]), int(cy - d[1])), (int(cx + d[0]), int(cy + d[1])), col,
                 max(1, int(rng.uniform(0.06, 0.16) * s)), cv2.LINE_AA)
    elif kind == 1:  # blob
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.ellipse(img, (int(cx), int(cy)), (int(rng.uniform(0.15, 0.35) * s), int(rng.uniform(0.1, 0.3) * s)),
                    float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
    else:  # hand-like: palm + four fingers, in a random skin tone
        col = tuple(float(v) for v in rng.uniform(60, 240) * np.array([1.0, 0.78, 0.62]))
        ang = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.2, 0.32) * s
        cv2.ellipse(img, (int(cx), int(cy)), (int(r), int(0.8 * r)), math.degrees(ang), 0, 360, col, -1, cv2.LINE_AA)
        for k in range(4):
            a = ang + (k - 1.5) * 0.35
            d = np.array([math.cos(a), math.sin(a)])
            e = np.array([cx, cy]) + d * r * 2.1
            cv2.line(img, (int(cx), int(cy)), (int(e[0]), int(e[1])), col, max(1, int(0.3 * r)), cv2.LINE_AA)


_NOISE_BANK = []


def _noise_bank():
    """Fixed [512, 512, 3] unit Gaussian luminance noise (same in R, G, B); images take a random
    window of it, which is as random as fresh noise for a nuisance and ten times cheaper."""
    if not _NOISE_BANK:
        n = np.random.default_rng(20150312).standard_normal((512, 512, 1), dtype=np.float32)
        _NOISE_BANK.append(np.ascontiguousarray(np.repeat(n, 3, axis=2)))
    return _NOISE_BANK[0]


def _postprocess(img, rng, difficulty, size):
    d = difficulty
    gamma = math.exp(0.15 * d * rng.uniform(-1, 1))
    contrast = 1.0 + 0.15 * d * rng.uniform(-1, 1)
    lut = np.clip(((np.arange(256) / 255.0) ** gamma - 0.5) * contrast * 255 + 127.5, 0, 255).astype(np.uint8)
    img = cv2.LUT(img, lut)
    sigma = d * rng.uniform(0.0, 1.0) * size / 160.0
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    noise = d * rng.uniform(0.0, 6.0)
    if noise > 0.5:
        bank = _noise_bank()
        h, w = img.shape[:2]
        if h <= bank.shape[0] // 2 and w <= bank.shape[1] // 2:
            oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - h, 2))
            tile = bank[oy:oy + h, ox:ox + w]
        else:
            tile = np.repeat(rng.standard_normal((h, w, 1), dtype=np.float32), 3, axis=2)
        img = cv2.addWeighted(img, 1.0, tile, float(noise), 0.0, dtype=cv2.CV_8U)
    return img


def render_face(identity_params, rng, image_size, difficulty=1.0):
    """Render one face of this identity with fresh nuisances from ``rng`` (numpy Generator).

    Args:
      identity_params: dict from :func:`data.synthetic.params.sample_identity`.
      image_size: output side S in pixels (square).
      difficulty: nuisance strength; 0 = frontal, neutral, clean; 1 = default.

    Returns uint8 RGB array [S, S, 3].
    """
    size = int(image_size)
    if size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    ss = 2 if size < 112 else 1  # supersample small images so sub-pixel features still count
    work = size * ss
    p = jitter_identity(identity_params, rng, amount=min(1.0, difficulty))
    scene = _Scene(p, rng, work, difficulty)
    img = _background(rng, work, difficulty)
    hair = p["hair"]
    style = p["hair_style"]
    _draw_shoulders(scene, img, rng)
    if style in ("long", "bob"):
        _draw_back_hair(scene, img, p, hair)
    _draw_neck(scene, img, p)
    if style == "bun":
        _draw_bun(scene, img, p, hair)
    if style not in ("bald", "buzz"):
        _draw_shell(scene, img, p, hair)
    ears = style not in ("long", "bob", "afro")
    if ears:
        for side in (-1, 1):
            if not _ear_faces_camera(scene, side):
                _draw_ear(scene, img, p, side)
    _draw_head(scene, img, p)
    if ears:
        for side in (-1, 1):
            if _ear_faces_camera(scene, side):
                _draw_ear(scene, img, p, side)
    _draw_brows(scene, img, p)
    _draw_eyes(scene, img, p)
    if p["mole"] is not None:
        mx, my = p["mole"]
        scene.surface_patch(img, mx + 0.025 * np.cos(_CIRCLE), my + 0.025 * np.sin(_CIRCLE), (60, 35, 25), 0.003)
    _draw_mouth(scene, img, p)
    _draw_nose(scene, img, p)
    if p["glasses"] != "none":
        _draw_glasses(scene, img, p)
    if rng.random() < 0.2 * difficulty:
        _occlude(img, rng, scene, p)
    if ss > 1:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return _postprocess(img, rng, difficulty, size)


def render_jpeg(identity_params, rng, image_size, difficulty=1.0):
    """:func:`render_face`, then JPEG-encode at a random quality (40..95, lower with difficulty).

    Returns (jpeg bytes, quality).
    """
    img = render_face(identity_params, rng, image_size, difficulty)
    quality = int(rng.integers(int(95 - 55 * min(difficulty, 1.0)), 96))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes(), quality
