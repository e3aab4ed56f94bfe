"""The cine short- and long-axis phantom: anatomy per diagnosis, motion, and each vendor's image chain.

Phantom model (all lengths in mm, so hearts keep their size whatever the scanner geometry):
the LV is a truncated ellipsoidal shell (cavity and myocardium) whose base descends towards the
fixed apex in systole; its endocardial radius follows the subject's ejection fraction and the
myocardial volume is conserved, so the wall thickens. The RV is an ellipse wrapped around the
septum (a crescent), shorter than the LV. Above the base the atria appear. A smooth raised-cosine
cycle goes from end-diastole (frame of largest volume) to end-systole and back.

Every subject renders from its own random streams (``_render_subject``), so the writers may run
in any order and a copy rendered from the same key is identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmrfed.data.synth_plan import MIN_IN_PLANE, _Planned

_CANONICAL = {"lv": 1, "myo": 2, "rv": 3}  # how the renderer numbers labels internally


# --- how each vendor's scanner looks ---------------------------------------------------------


@dataclass(frozen=True)
class ScannerLook:
    """A vendor's protocol and image chain: geometry ranges and the intensity transfer."""

    fov_mm: tuple[float, float]       # in-plane field of view; spacing = fov / matrix
    matrix_scale: float               # in-plane matrix = --shape x, y times this
    coverage_mm: tuple[float, float]  # stack coverage; slice thickness = coverage / slices
    slice_offset: int                 # slices relative to --shape z
    frames: tuple[int, int]           # cine frames per cycle, inclusive range
    gamma: float                      # intensity transfer curve exponent
    gain: float                       # stored value of full blood signal
    noise: float                      # noise sigma relative to blood signal (Rician magnitude)
    bias: float                       # strength of the smooth multiplicative coil bias field
    myocardium: float                 # myocardium / blood signal (SSFP contrast)


LOOKS: dict[str, ScannerLook] = {
    "siemens": ScannerLook((135, 150), 1.0, (80, 92), 0, (14, 18), 1.0, 450, 0.035, 0.15, 0.28),
    "philips": ScannerLook((140, 155), 1.125, (84, 96), 1, (18, 22), 0.8, 1800, 0.05, 0.25, 0.33),
    "ge": ScannerLook((145, 160), 0.875, (80, 92), -1, (11, 14), 1.3, 1100, 0.065, 0.3, 0.24),
    "canon": ScannerLook((135, 150), 1.0625, (84, 96), 0, (13, 16), 0.9, 700, 0.045, 0.2, 0.3),
}


# --- what each diagnosis does to the heart ----------------------------------------------------


@dataclass(frozen=True)
class Archetype:
    """Anatomy and motion of a diagnosis: (mean, sd) draws per subject, in mm and fractions."""

    lv_radius: tuple[float, float]     # ED mid-ventricular endocardial radius
    wall: tuple[float, float]          # ED LV wall thickness
    lv_ef: tuple[float, float]         # ejection fraction of the contracting myocardium
    rv_scale: tuple[float, float]      # RV size relative to a normal RV
    rv_ef: tuple[float, float]
    sphericity: float = 2.6            # LV length / epicardial radius (dilated hearts are rounder)
    septal: float = 0.0                # extra septal wall thickness (asymmetric hypertrophy)
    infarct: bool = False              # a thinned, akinetic sector (scar)
    trabeculation: float = 0.0         # spongy apical endocardium (non-compaction)
    rv_wall: float = 3.0               # RV free wall thickness
    rv_aneurysm: bool = False          # akinetic free-wall bulge (arrhythmogenic RV)


ARCHETYPES: dict[str, Archetype] = {
    "normal": Archetype((24, 1.8), (8.0, 0.8), (0.62, 0.04), (1.0, 0.07), (0.56, 0.05)),
    "dilated": Archetype((32, 2.5), (6.2, 0.7), (0.27, 0.07), (1.1, 0.1), (0.42, 0.07),
                         sphericity=2.2),
    "hypertrophic": Archetype((20, 1.8), (15.0, 2.0), (0.72, 0.04), (0.95, 0.07), (0.6, 0.05),
                              sphericity=2.4, septal=0.35),
    "infarct": Archetype((27, 2.0), (8.0, 0.8), (0.5, 0.06), (1.0, 0.08), (0.5, 0.06),
                         infarct=True),
    "ischaemic": Archetype((26, 2.0), (8.0, 0.8), (0.52, 0.06), (1.0, 0.08), (0.52, 0.06),
                           infarct=True),
    "hypertensive": Archetype((23.5, 1.8), (11.0, 1.0), (0.64, 0.04), (1.0, 0.07), (0.56, 0.05),
                              septal=0.1),
    "abnormal_rv": Archetype((22.5, 1.8), (7.8, 0.8), (0.6, 0.05), (1.45, 0.12), (0.33, 0.06)),
    "arrhythmogenic_rv": Archetype((23.5, 1.8), (7.8, 0.8), (0.58, 0.05), (1.35, 0.12),
                                   (0.35, 0.06), rv_aneurysm=True),
    "athlete": Archetype((27, 1.5), (9.5, 0.7), (0.6, 0.04), (1.2, 0.08), (0.55, 0.05)),
    "non_compaction": Archetype((27, 2.0), (7.5, 0.8), (0.42, 0.06), (1.0, 0.08), (0.5, 0.06),
                                trabeculation=0.14),
    "other": Archetype((26, 2.5), (9.0, 1.2), (0.5, 0.08), (1.1, 0.1), (0.5, 0.07)),
    "fallot": Archetype((22, 1.8), (7.8, 0.8), (0.58, 0.05), (1.4, 0.12), (0.38, 0.06),
                        rv_wall=6.0),
    "shunt": Archetype((22.5, 1.8), (7.8, 0.8), (0.62, 0.04), (1.35, 0.1), (0.58, 0.05)),
    "dilated_rv": Archetype((23, 1.8), (7.8, 0.8), (0.6, 0.05), (1.45, 0.12), (0.45, 0.06)),
    "tricuspid": Archetype((23, 1.8), (7.8, 0.8), (0.62, 0.05), (1.4, 0.12), (0.5, 0.06)),
}


# --- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heart:
    """One subject's heart, drawn once and shared by the short- and long-axis views."""

    ri0: float          # ED mid-ventricular endocardial radius
    re0: float          # ED epicardial radius
    li0: float          # ED endocardial length base -> apex
    le0: float          # ED epicardial length
    ef: float
    descent: float      # base descent at ES (long-axis shortening)
    rv_a0: float        # RV ellipse semi-axis towards the free wall, ED
    rv_b0: float        # RV ellipse semi-axis along the septum, ED
    rv_ef: float
    rv_length: float
    septal: float
    infarct_angle: float | None
    infarct_width: float
    trabeculation: float
    trab_lobes: int
    trab_phase: float
    rv_wall: float
    rv_aneurysm: bool
    es_fraction: float  # ES time as a fraction of the cycle


@dataclass(frozen=True)
class _Geometry:
    matrix: tuple[int, int, int]
    spacing: tuple[float, float, float]
    frames: int
    dt_ms: float
    origin: tuple[float, float, float]
    centre_mm: tuple[float, float]   # heart centre relative to the image centre
    theta: float                     # direction from LV to RV in the image plane
    base_mm: float                   # depth of the ED base plane below the first slice edge


def _draw(rng: np.random.Generator, mean_sd: tuple[float, float], low: float, high: float) -> float:
    return float(np.clip(rng.normal(*mean_sd), low, high))


def _draw_heart(archetype: Archetype, coverage: float, rng: np.random.Generator) -> _Heart:
    body = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    ri0 = body * _draw(rng, archetype.lv_radius, 14, 42)
    wall = body * _draw(rng, archetype.wall, 4, 22)
    ef = _draw(rng, archetype.lv_ef, 0.12, 0.82)
    re0 = ri0 + wall
    le0 = min(re0 * archetype.sphericity, 0.9 * coverage)
    li0 = le0 - wall
    rv_scale = body * _draw(rng, archetype.rv_scale, 0.8, 1.8)
    return _Heart(
        ri0=ri0, re0=re0, li0=li0, le0=le0, ef=ef, descent=0.2 * ef * li0,
        rv_a0=17.0 * rv_scale, rv_b0=38.0 * math.sqrt(rv_scale),
        rv_ef=_draw(rng, archetype.rv_ef, 0.15, 0.75), rv_length=0.78 * le0,
        septal=archetype.septal * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(0.0, 0.06)),
        infarct_angle=float(rng.uniform(0.6, 2 * math.pi - 0.6)) if archetype.infarct else None,
        infarct_width=float(rng.uniform(0.6, 1.0)),
        trabeculation=archetype.trabeculation * float(rng.uniform(0.8, 1.2)),
        trab_lobes=int(rng.integers(9, 14)), trab_phase=float(rng.uniform(0, 2 * math.pi)),
        rv_wall=archetype.rv_wall, rv_aneurysm=archetype.rv_aneurysm,
        es_fraction=float(rng.uniform(0.33, 0.42)),
    )


def _draw_geometry(look: ScannerLook, shape: tuple[int, int, int], frames: int | None,
                   coverage: float, rng: np.random.Generator) -> _Geometry:
    nx = max(MIN_IN_PLANE // 2, round(shape[0] * look.matrix_scale))
    ny = max(MIN_IN_PLANE // 2, round(shape[1] * look.matrix_scale))
    nz = max(3, shape[2] + look.slice_offset + int(rng.integers(0, 2)))
    fov = float(rng.uniform(*look.fov_mm))
    in_plane = round(fov / max(nx, ny), 4)
    thickness = round(coverage / nz * 2) / 2  # scanners prescribe thickness in 0.5 mm steps
    n_frames = frames if frames is not None else int(rng.integers(look.frames[0], look.frames[1] + 1))
    rr_ms = float(rng.uniform(750, 1100))
    origin = (round(float(rng.uniform(-40, 40)) + nx * in_plane / 2, 3),
              round(float(rng.uniform(-40, 40)) + ny * in_plane / 2, 3),
              round(float(rng.uniform(-60, 0)), 3))
    centre = (float(rng.normal(0, 0.04)) * fov, float(rng.normal(0, 0.04)) * fov)
    return _Geometry((nx, ny, nz), (in_plane, in_plane, thickness), n_frames,
                     round(rr_ms / n_frames, 3), origin, centre,
                     float(rng.uniform(-0.5, 0.5)) + math.pi, float(rng.uniform(0.1, 0.4)) * thickness)


def contraction_curve(frames: int, es_fraction: float) -> tuple[np.ndarray, int]:
    """Contraction (0 at ED, 1 at ES) per frame: raised cosines down to ES and back; ES index."""
    es = int(np.clip(round(es_fraction * frames), 2, frames - 2))
    t = np.arange(frames, dtype=np.float64)
    systole = 0.5 * (1 - np.cos(np.pi * t / es))
    diastole = 0.5 * (1 + np.cos(np.pi * (t - es) / (frames - es)))
    return np.where(t <= es, systole, diastole), es


def _inside(distance: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``distance`` edge-widths inside a
    boundary: a linear ramp, cheaper than a logistic and as good at one voxel's scale."""
    return np.clip(0.5 + 0.5 * distance, 0.0, 1.0)


def _smoothstep(x: np.ndarray | float, low: float, high: float) -> np.ndarray:
    y = np.clip((np.asarray(x) - low) / (high - low), 0.0, 1.0)
    return y * y * (3 - 2 * y)


@dataclass(frozen=True)
class _Polar:
    """In-plane coordinates relative to the LV centre, rotated so angle 0 points to the RV."""

    u: np.ndarray
    v: np.ndarray
    r: np.ndarray
    phi: np.ndarray


def _polar(x: np.ndarray, y: np.ndarray, theta: float) -> _Polar:
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    return _Polar(u, v, np.hypot(u, v), np.arctan2(v, u))


def _lv_radii(heart: _Heart, phi: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray, float, float]:
    """Endo/epicardial equatorial radii per angle at contraction c, infarct weight, lengths."""
    wall0 = (heart.re0 - heart.ri0) * (1 + heart.septal * np.cos(phi))
    scar = np.zeros_like(phi)
    if heart.infarct_angle is not None:
        closeness = np.cos(phi - heart.infarct_angle)
        scar = np.clip((closeness - math.cos(heart.infarct_width)) * 4.0, 0.0, 1.0)
        wall0 = wall0 * (1 - 0.5 * scar)
    ri0 = heart.ri0
    re0 = ri0 + wall0
    li_es = heart.li0 - heart.descent
    k_remote = math.sqrt((1 - heart.ef) * heart.li0 / li_es)
    li = heart.li0 - heart.descent * c
    le = heart.le0 - heart.descent * c
    ri = ri0 * (1 + (k_remote - 1) * c * (1 - scar))
    # the myocardium keeps its volume: a thinner cavity means a thicker wall
    re = np.sqrt((re0**2 * heart.le0 - ri0**2 * heart.li0 + ri**2 * li) / le)
    return ri, re, scar, li, le


def _heart_fractions(heart: _Heart, polar: _Polar, depth: np.ndarray, c: float, edge: float,
                     with_labels: bool) -> dict[str, np.ndarray]:
    """Soft tissue fractions (blood, wall) and, if asked, hard labels of the heart at contraction c.

    ``depth`` is the distance below the ED base plane; the base descends by ``descent * c``.
    """
    ri_eq, re_eq, _, li, le = _lv_radii(heart, polar.phi, c)
    d = depth - heart.descent * c
    inside_i = (d >= 0) & (d <= li)
    inside_e = (d >= 0) & (d <= le)
    taper_i = np.sqrt(np.clip(1 - (d / li) ** 2, 0, 1))
    taper_e = np.sqrt(np.clip(1 - (d / le) ** 2, 0, 1))
    ri = ri_eq * taper_i
    if heart.trabeculation > 0:
        lobes = 0.5 * (1 + np.sin(heart.trab_lobes * polar.phi + heart.trab_phase))
        ri = ri * (1 - heart.trabeculation * lobes * _smoothstep(d / li, 0.3, 0.6))
    ri = np.where(inside_i, ri, -50.0)
    re = np.where(inside_e, re_eq * taper_e, -50.0)
    endo = _inside((ri - polar.r) / edge)
    epi = np.maximum(_inside((re - polar.r) / edge), endo)

    # RV: an ellipse wrapped around the septum, minus the LV; it shortens and narrows in systole.
    rv_len = heart.rv_length - 1.2 * heart.descent * c
    k_rv = 1 + (math.sqrt(1 - heart.rv_ef) - 1) * c
    taper_rv = np.sqrt(np.clip(1 - (d / rv_len) ** 2, 0, 1)) * ((d >= 0) & (d <= rv_len))
    a = heart.rv_a0 * k_rv * taper_rv + 1e-3
    b = heart.rv_b0 * k_rv * taper_rv + 1e-3
    septum = heart.re0 * np.sqrt(np.clip(1 - (depth / heart.le0) ** 2, 0, 1))
    centre_u = septum + 0.2 * heart.rv_a0 * taper_rv
    rho = np.sqrt(((polar.u - centre_u) / a) ** 2 + (polar.v / b) ** 2)
    rv_cavity = _inside((1 - rho) * np.sqrt(a * b) / edge)
    rho_wall = np.sqrt(((polar.u - centre_u) / (a + heart.rv_wall)) ** 2
                       + (polar.v / (b + heart.rv_wall)) ** 2)
    rv_outer = _inside((1 - rho_wall) * np.sqrt(a * b) / edge) * (taper_rv > 0)
    if heart.rv_aneurysm:  # an akinetic free-wall bulge keeps its diastolic size
        bulge_r = 0.35 * heart.rv_a0 * taper_rv + 1e-3
        du = polar.u - (centre_u + heart.rv_a0 * taper_rv * 0.9)
        dv = polar.v - 0.45 * heart.rv_b0 * taper_rv
        bulge = _inside((bulge_r - np.hypot(du, dv)) / edge) * (taper_rv > 0)
        rv_cavity = np.maximum(rv_cavity, bulge)
        rv_outer = np.maximum(rv_outer, _inside((bulge_r + heart.rv_wall - np.hypot(du, dv)) / edge)
                              * (taper_rv > 0))
    rv_cavity = rv_cavity * (1 - epi)
    rv_outer = np.maximum(rv_outer * (1 - epi), rv_cavity)

    # Atria: above the (descending) base plane, blood pools labelled background; only the few
    # slices above the base need them.
    blood = endo + rv_cavity
    above = np.flatnonzero((d < 0) & (d > -25))
    if above.size:
        la = _inside((0.85 * heart.ri0 - polar.r) / edge)
        ra = _inside((1 - np.sqrt(((polar.u - heart.re0 - 0.2 * heart.rv_a0) / heart.rv_a0) ** 2
                                   + (polar.v / (0.8 * heart.rv_b0)) ** 2)) * heart.rv_a0 / edge)
        atria = np.maximum(la, ra) * (1 - epi[..., above]) * (1 - rv_outer[..., above])
        blood[..., above] += atria
    wall = (epi - endo) + (rv_outer - rv_cavity)
    parts = {"blood": blood, "wall": wall, "heart": np.clip(blood + wall, 0, 1)}
    if with_labels:
        labels = np.zeros(np.broadcast_shapes(endo.shape, rv_cavity.shape), dtype=np.uint8)
        labels[rv_cavity > 0.5] = _CANONICAL["rv"]
        labels[epi > 0.5] = _CANONICAL["myo"]
        labels[endo > 0.5] = _CANONICAL["lv"]
        parts["labels"] = labels
    return parts


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]
                  ) -> np.ndarray:
    """A smooth random field of unit-ish amplitude (coil bias, tissue texture)."""
    grid = rng.standard_normal(coarse)
    field = ndimage.zoom(grid, [s / g for s, g in zip(shape, coarse, strict=True)], order=1,
                         mode="nearest", grid_mode=True)
    return field[tuple(slice(0, s) for s in shape)]


def _background(x: np.ndarray, y: np.ndarray, fov: float, rng: np.random.Generator,
                liver: np.ndarray, edge: float) -> np.ndarray:
    """Chest around the heart: body tissue with texture, subcutaneous fat, lungs, air, liver."""
    body_a, body_b = fov * rng.uniform(0.56, 0.64), fov * rng.uniform(0.44, 0.5)
    by = fov * rng.uniform(0.02, 0.08)
    body_rho = np.sqrt((x / body_a) ** 2 + ((y - by) / body_b) ** 2)
    body = _inside((1 - body_rho) * body_b / edge)
    fat = _inside((body_rho - 1 + 10.0 / body_b) * body_b / edge) * body
    texture = 1 + 0.15 * _smooth_field(rng, x.shape, (10, 10, 1)[: x.ndim])
    image = body * 0.3 * texture + fat * 0.45
    for side in (-1, 1):
        lx = side * fov * rng.uniform(0.36, 0.42)
        rho = np.sqrt(((x - lx) / (fov * 0.14)) ** 2 + ((y - by) / (fov * 0.3)) ** 2)
        lung = _inside((1 - rho) * fov * 0.14 / edge)
        image = image * (1 - lung) + 0.04 * lung
    liver_mask = _inside((1 - np.sqrt(((x + fov * 0.2) / (fov * 0.35)) ** 2
                                       + ((y - fov * 0.25) / (fov * 0.2)) ** 2)) * 20 / edge)
    return image * (1 - liver_mask * liver) + 0.42 * liver_mask * liver


def _scanner_chain(signal: np.ndarray, look: ScannerLook, bias: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Bias field, transfer curve, Rician magnitude noise and gain, stored as int16."""
    shaped = np.clip(signal * bias, 0, None)
    if look.gamma != 1.0:
        shaped **= look.gamma
    real = rng.standard_normal(shaped.shape, dtype=np.float32)
    real *= look.noise
    real += shaped
    imag = rng.standard_normal(shaped.shape, dtype=np.float32)
    imag *= look.noise
    magnitude = np.hypot(real, imag)
    magnitude *= look.gain
    np.clip(magnitude, 0, np.iinfo(np.int16).max, out=magnitude)
    return np.rint(magnitude, out=magnitude).astype(np.int16)


@dataclass(frozen=True)
class _Rendered:
    cine: np.ndarray            # (x, y, z, t) int16
    labels_ed: np.ndarray       # (x, y, z) uint8, canonical numbering
    labels_es: np.ndarray
    ed: int
    es: int
    geometry: _Geometry
    long_axis: _LongAxis | None


@dataclass(frozen=True)
class _LongAxis:
    cine: np.ndarray            # (x, y, 1, t) int16
    labels_ed: np.ndarray       # (x, y, 1) uint8
    labels_es: np.ndarray
    spacing: tuple[float, float, float]


def _render_short_axis(heart: _Heart, geometry: _Geometry, look: ScannerLook,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    nx, ny, nz = geometry.matrix
    sx, sy, sz = geometry.spacing
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
    depth = ((np.arange(nz, dtype=np.float32) + 0.5) * sz - geometry.base_mm)[None, None, :]
    fov = max(nx * sx, ny * sy)
    edge = 0.5 * sx
    xx, yy = np.broadcast_arrays(x, y)
    xx, yy = xx[..., 0], yy[..., 0]
    liver = _smoothstep(depth / heart.le0, 0.5, 1.0)
    background = _background(xx[..., None], yy[..., None], fov, rng, liver, edge)
    polar = _polar(x - geometry.centre_mm[0], y - geometry.centre_mm[1], geometry.theta)
    bias = np.exp(look.bias * _smooth_field(rng, (nx, ny, nz), (3, 3, 2))).astype(np.float32)
    curve, es = contraction_curve(geometry.frames, heart.es_fraction)
    cine = np.empty((nx, ny, nz, geometry.frames), dtype=np.int16)
    labels: dict[int, np.ndarray] = {}
    for t, c in enumerate(curve):
        parts = _heart_fractions(heart, polar, depth, float(c), edge, with_labels=t in (0, es))
        blood_signal = 1.0 - 0.05 * c  # inflow brightness drops a little in systole
        signal = (background * (1 - parts["heart"]) + blood_signal * parts["blood"]
                  + look.myocardium * parts["wall"]).astype(np.float32)
        cine[..., t] = _scanner_chain(signal, look, bias, rng)
        if t in (0, es):
            labels[t] = parts["labels"]
    return cine, labels[0], labels[es], es


def _render_long_axis(heart: _Heart, geometry: _Geometry, look: ScannerLook,
                      rng: np.random.Generator) -> _LongAxis:
    """A 4-chamber view: LV on the image right, RV on the left, atria above the base."""
    nx, ny, _ = geometry.matrix
    spacing = geometry.spacing[0]
    fov = max(nx, ny) * spacing
    edge = 0.5 * spacing
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * spacing)[:, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * spacing)[None, :]
    xx, yy = np.broadcast_arrays(x, y)
    background = _background(np.asarray(xx), np.asarray(yy), fov, rng, np.zeros(1), edge)
    bias = np.exp(look.bias * _smooth_field(rng, (nx, ny), (3, 3))).astype(np.float32)
    top = -0.45 * heart.le0  # base plane, image y grows towards the apex
    curve, es = contraction_curve(geometry.frames, heart.es_fraction)
    cine = np.empty((nx, ny, 1, geometry.frames), dtype=np.int16)
    labels: dict[int, np.ndarray] = {}
    rv_half0 = 0.6 * heart.rv_a0
    rv_x = -(heart.re0 + rv_half0 + heart.rv_wall)
    for t, c in enumerate(curve):
        ri, re, _, li, le = _lv_radii(heart, np.array([math.pi / 2]), float(c))
        base = top + heart.descent * c
        d = y - base
        endo = _inside((ri[0] * np.sqrt(np.clip(1 - (d / li) ** 2, 0, 1)) - np.abs(x)) / edge)
        endo = endo * (d >= 0)
        epi = _inside((re[0] * np.sqrt(np.clip(1 - (d / le) ** 2, 0, 1)) - np.abs(x)) / edge)
        epi = np.maximum(epi * (d >= 0), endo)
        rv_len = heart.rv_length - 1.2 * heart.descent * c
        rv_half = rv_half0 * (1 + (math.sqrt(1 - heart.rv_ef) - 1) * c)
        d_rv = y - (top + 1.2 * heart.descent * c)
        rv_w = rv_half * np.sqrt(np.clip(1 - (d_rv / rv_len) ** 2, 0, 1)) * (d_rv >= 0)
        rv_cavity = _inside((rv_w - np.abs(x - rv_x)) / edge) * (1 - epi) * (rv_w > 0)
        rv_outer = np.maximum(_inside((rv_w + heart.rv_wall - np.abs(x - rv_x)) / edge)
                              * (1 - epi) * (rv_w > 0), rv_cavity)
        la = _inside((1 - np.hypot(x / (0.9 * heart.ri0), (y - base + 20) / 20)) * 15 / edge)
        ra = _inside((1 - np.hypot((x - rv_x) / (1.1 * rv_half0), (y - base + 18) / 18)) * 12
                      / edge)
        atria = np.maximum(la, ra) * (d < 0)
        blood = endo + rv_cavity + atria
        wall = (epi - endo) + (rv_outer - rv_cavity)
        heart_part = np.clip(blood + wall, 0, 1)
        signal = (background * (1 - heart_part) + (1 - 0.05 * c) * blood
                  + look.myocardium * wall).astype(np.float32)
        cine[:, :, 0, t] = _scanner_chain(signal, look, bias, rng)
        if t in (0, es):
            frame_labels = np.zeros((nx, ny, 1), dtype=np.uint8)
            frame_labels[..., 0][rv_cavity > 0.5] = _CANONICAL["rv"]
            frame_labels[..., 0][epi > 0.5] = _CANONICAL["myo"]
            frame_labels[..., 0][endo > 0.5] = _CANONICAL["lv"]
            labels[t] = frame_labels
    return _LongAxis(cine, labels[0], labels[es], (spacing, spacing, 8.0))


def _streams(seed: int, planned: _Planned) -> list[np.random.Generator]:
    """A subject's own random streams: 0 heart and geometry, 1 short-axis noise and texture,
    2 the long-axis view."""
    return [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*planned.render_key, k)))
            for k in range(3)]


def _heart_of(planned: _Planned, look: ScannerLook, stream: np.random.Generator) -> tuple[_Heart, float]:
    """The subject's heart and the stack coverage, the first draws of stream 0."""
    coverage = float(stream.uniform(*look.coverage_mm))
    return _draw_heart(ARCHETYPES[planned.archetype], coverage, stream), coverage


def wall_thickness_mm(seed: int, planned: _Planned) -> float:
    """The subject's ED LV wall thickness (mm), as its rendered heart will have it.

    The heart is drawn from the subject's own stream exactly as :func:`_render_subject` draws it;
    the coverage drawn first only sets the heart's length, so the wall does not depend on the
    scanner's look (any look gives the same draws).
    """
    heart, _ = _heart_of(planned, LOOKS[planned.subject.client], _streams(seed, planned)[0])
    return heart.re0 - heart.ri0


def _render_subject(seed: int, planned: _Planned, shape: tuple[int, int, int],
                   frames: int | None, long_axis: bool,
                   looks: Mapping[str, ScannerLook] = LOOKS) -> _Rendered:
    """Render one subject from its own random streams (independent of every other subject).

    Stream 0 draws the heart and the scan geometry, 1 the short-axis image noise and texture,
    2 the long-axis view; so a copy rendered from the same key is identical, LA or not.
    ``looks`` is each client's scanner look (the appearance knob, cmrfed/data/synth_dial.py).
    """
    look = looks[planned.subject.client]
    streams = _streams(seed, planned)
    heart, coverage = _heart_of(planned, look, streams[0])
    geometry = _draw_geometry(look, shape, frames, coverage, streams[0])
    shift = int(streams[0].integers(1, geometry.frames)) if planned.ed_shift else 0
    cine, labels_ed, labels_es, es = _render_short_axis(heart, geometry, look, streams[1])
    cine = np.roll(cine, shift, axis=3)
    la = None
    if long_axis:
        la = _render_long_axis(heart, geometry, look, streams[2])
        la = _LongAxis(np.roll(la.cine, shift, axis=3), la.labels_ed, la.labels_es, la.spacing)
    return _Rendered(cine, labels_ed, labels_es, shift, (es + shift) % geometry.frames, geometry, la)
