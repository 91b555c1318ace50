"""Planar contours from binary masks, and back.

A mask slice is traced along the pixel edges: every boundary between a foreground and a
background pixel becomes a directed edge, and the edges are linked into closed loops.
Outer boundaries run one way and holes the other, so holes come out as separate inner
contours. The polygon through the midpoints of those edges is the 0.5 iso-line that
marching squares would give; it passes at least 0.354 pixel from every pixel centre, on
the correct side, so filling it by the even-odd rule at pixel centres (as planning
systems and plastimatch do) gives back the mask exactly. The polygons are simplified
with Douglas-Peucker at a tolerance below that margin (and at most 0.5 mm), so the
simplified polygon still fills the same pixel centres while dropping staircase points.

Coordinates are ``(row, column)`` pixel indices where ``(0, 0)`` is the centre of the
first pixel; corners lie on half-integers.
"""

from __future__ import annotations

import numpy as np

#: Largest deviation (mm) allowed when simplifying a contour.
MAX_SIMPLIFY_MM = 0.5
#: Tolerance as a fraction of the smallest pixel spacing. The edge-midpoint polygon passes
#: at least sqrt(2)/4 = 0.354 pixel from every pixel centre, so a smaller deviation keeps
#: every centre on its side and the filled polygon equals the mask.
_PIXEL_FRACTION = 0.3

# Edge directions as (d_row, d_col): up, left, down, right.
_DIRS = np.array([(-1, 0), (0, -1), (1, 0), (0, 1)])


def trace_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Trace the pixel-edge boundary loops of a 2D mask.

    Parameters
    ----------
    mask
        2D boolean array ``(rows, columns)``.

    Returns
    -------
    list of numpy.ndarray
        One ``(n, 2)`` array of ``(row, column)`` corner coordinates per closed loop,
        one vertex per pixel corner passed (unit steps). Outer boundaries
        have negative signed area (see :func:`signed_area`), holes positive. Pixels that
        touch only diagonally are traced as separate loops.
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"Invalid 'mask' shape '{m.shape}' - must be 2D")
    if not m.any():
        return []
    p = np.pad(m, 1)
    width = p.shape[1] + 1  # vertex grid width
    fg = p[1:-1, 1:-1]
    # Vertex (i, j) is the top-left corner of padded pixel (i, j).
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    dirs: list[np.ndarray] = []
    # Walk with the foreground on the left (counter-clockwise on screen around objects).
    for neighbour, start, end, d in (
        (p[:-2, 1:-1], (0, 1), (0, 0), 1),   # top side: leftwards
        (p[1:-1, :-2], (0, 0), (1, 0), 2),   # left side: downwards
        (p[2:, 1:-1], (1, 0), (1, 1), 3),    # bottom side: rightwards
        (p[1:-1, 2:], (1, 1), (0, 1), 0),    # right side: upwards
    ):
        r, c = np.nonzero(fg & ~neighbour)
        r = r + 1
        c = c + 1
        starts.append((r + start[0]) * width + c + start[1])
        ends.append((r + end[0]) * width + c + end[1])
        dirs.append(np.full(r.shape, d))
    start_v = np.concatenate(starts)
    end_v = np.concatenate(ends)
    dir_v = np.concatenate(dirs)

    order = np.argsort(start_v, kind="stable")
    start_v, end_v, dir_v = start_v[order], end_v[order], dir_v[order]
    # A vertex has one outgoing edge, or two at a saddle (diagonal pixels). Each edge's
    # successor is the first edge leaving its end vertex; at a saddle, the one turning
    # left (towards the foreground) so diagonal pixels stay apart.
    count = np.searchsorted(start_v, start_v, side="right") \
        - np.searchsorted(start_v, start_v, side="left")
    nxt = np.searchsorted(start_v, end_v, side="left")
    nxt += (count[nxt] == 2) & (dir_v[nxt] != (dir_v + 1) % 4)
    # Every edge has one successor and one predecessor: the loops are the successor
    # cycles, each started at its lowest edge index.
    successor = nxt.tolist()
    used = bytearray(len(successor))
    loops: list[np.ndarray] = []
    for seed in range(len(successor)):
        if used[seed]:
            continue
        chain: list[int] = []
        edge = seed
        while not used[edge]:
            used[edge] = 1
            chain.append(edge)
            edge = successor[edge]
        ids = start_v[chain]
        loops.append(np.stack([ids // width - 1.5, ids % width - 1.5], axis=1))
    return loops


def _corners_only(loop: np.ndarray) -> np.ndarray:
    """Drop vertices where the loop goes straight on."""
    before = loop - np.roll(loop, 1, axis=0)
    after = np.roll(loop, -1, axis=0) - loop
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return loop[turn != 0]


def signed_area(loop: np.ndarray) -> float:
    """Shoelace area of a ``(row, column)`` loop in pixel units.

    Negative for outer boundaries as traced by :func:`trace_loops`, positive for holes.
    """
    x = loop[:, 1]
    y = loop[:, 0]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def simplify_tolerance_mm(spacing: tuple[float, float]) -> float:
    """Douglas-Peucker tolerance in mm for a pixel spacing ``(row, column)``.

    At most :data:`MAX_SIMPLIFY_MM`, and below half the smallest pixel spacing so that
    no pixel centre changes side.
    """
    return min(MAX_SIMPLIFY_MM, _PIXEL_FRACTION * min(spacing))


def simplify_loop(loop: np.ndarray, spacing: tuple[float, float],
                  tolerance_mm: float) -> np.ndarray:
    """Simplify one closed loop with Douglas-Peucker, measuring deviation in mm.

    The one-loop form of :func:`simplify_loops` (same parameters, same kept vertices);
    returns the kept ``(row, column)`` vertices in order.
    """
    return simplify_loops([loop], spacing, tolerance_mm)[0]


def simplify_loops(loops: list[np.ndarray], spacing: tuple[float, float],
                   tolerance_mm: float) -> list[np.ndarray]:
    """Simplify closed loops with Douglas-Peucker, all loops at once.

    Each loop is split at vertex 0 and the vertex farthest from it, and each chain is
    split recursively at the vertex farthest from its chord while that is more than
    ``tolerance_mm`` away. Whether a chain is split depends only on its own end points,
    so every open chain of every loop is handled in the same round of array operations
    (a few dozen rounds in all instead of one Python iteration per chain); the kept
    vertices are exactly those of the recursive formulation.

    Parameters
    ----------
    loops
        ``(n, 2)`` ``(row, column)`` vertices of closed loops (last point not repeated).
    spacing
        Pixel spacing ``(row, column)`` in mm.
    tolerance_mm
        Largest distance (mm) of any removed vertex from its simplified polygon.

    Returns
    -------
    list of numpy.ndarray
        The kept vertices of each loop, in order; loops of at most 4 vertices unchanged.
    """
    if tolerance_mm < 0:
        raise ValueError(f"Invalid 'tolerance_mm' value '{tolerance_mm}' - must be >= 0")
    scale = np.asarray(spacing, float)[None, :]
    blocks, starts, fars = [], [], []
    offset = 0
    for loop in loops:
        if len(loop) <= 4:
            continue
        mm = loop * scale
        fars.append(int(np.argmax(((mm - mm[0]) ** 2).sum(axis=1))))
        blocks.append(np.concatenate([mm, mm[:1]]))  # closed: vertex n is vertex 0 again
        starts.append(offset)
        offset += len(mm) + 1
    if not blocks:
        return list(loops)
    closed = np.concatenate(blocks)
    keep = np.zeros(len(closed), bool)
    first = np.asarray(starts)
    far = first + np.asarray(fars)
    last = first + np.asarray([len(b) - 1 for b in blocks])
    keep[first] = keep[far] = True
    a = np.concatenate([first, far])
    b = np.concatenate([far, last])
    while True:
        open_ = b - a >= 2
        a, b = a[open_], b[open_]
        if not a.size:
            break
        inner = b - a - 1
        begin = np.cumsum(inner) - inner  # each chain's first interior point in the batch
        chain = np.repeat(np.arange(len(a)), inner)
        point = np.arange(len(chain)) - begin[chain] + a[chain] + 1
        seg = closed[b] - closed[a]
        pts = closed[point] - closed[a][chain]
        length = np.hypot(seg[:, 0], seg[:, 1])
        degenerate = length == 0.0
        dist = np.abs(pts[:, 0] * seg[chain, 1] - pts[:, 1] * seg[chain, 0]) \
            / np.where(degenerate, 1.0, length)[chain]
        if degenerate.any():
            dist = np.where(degenerate[chain], np.hypot(pts[:, 0], pts[:, 1]), dist)
        # The first farthest interior point of each chain (as numpy.argmax picks it).
        peak = np.maximum.reduceat(dist, begin)
        at_peak = np.flatnonzero(dist == peak[chain])
        _, first_at_peak = np.unique(chain[at_peak], return_index=True)
        best = at_peak[first_at_peak]
        split = dist[best] > tolerance_mm
        mid = point[best][split]
        keep[mid] = True
        a, b = np.concatenate([a[split], mid]), np.concatenate([mid, b[split]])
    out = []
    index = 0
    for loop in loops:
        if len(loop) <= 4:
            out.append(loop)
            continue
        out.append(loop[keep[starts[index]:starts[index] + len(loop)]])
        index += 1
    return out


def _midpoint_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Traced loops through the midpoints of the pixel edges, corners only.

    The midpoints are the 0.5 iso-line between inside and outside pixel centres (as
    marching squares finds it), which cuts staircase corners.
    """
    return [_corners_only((loop + np.roll(loop, -1, axis=0)) / 2.0)
            for loop in trace_loops(mask)]


def _is_polygon(simple: np.ndarray) -> bool:
    return len(simple) >= 3 and abs(signed_area(simple)) > 1e-6


def mask_to_polygons(mask: np.ndarray, spacing: tuple[float, float],
                     tolerance_mm: float | None = None) -> list[np.ndarray]:
    """Closed planar polygons (outer boundaries and holes) of one 2D mask slice.

    :func:`volume_to_polygons` of a one-slice volume (same ``spacing`` and
    ``tolerance_mm``): ``(n, 2)`` ``(row, column)`` polygons with at least 3 vertices and
    non-zero area; degenerate loops are dropped; holes are separate polygons (even-odd
    rule).
    """
    return [polygon for _, polygon in volume_to_polygons(np.asarray(mask)[None], spacing,
                                                         tolerance_mm)]


def volume_to_polygons(mask: np.ndarray, spacing: tuple[float, float],
                       tolerance_mm: float | None = None) -> list[tuple[int, np.ndarray]]:
    """:func:`mask_to_polygons` of every slice of a 3D mask, simplified in one batch.

    Parameters
    ----------
    mask
        3D boolean array ``(slices, rows, columns)``.
    spacing
        Pixel spacing ``(row, column)`` in mm.
    tolerance_mm
        Simplification tolerance; default :func:`simplify_tolerance_mm`.

    Returns
    -------
    list of (int, numpy.ndarray)
        ``(slice index, polygon)`` in slice order; per slice the polygons
        :func:`mask_to_polygons` gives, in its order.
    """
    tol = simplify_tolerance_mm(spacing) if tolerance_mm is None else tolerance_mm
    indices, loops = [], []
    for z in np.nonzero(mask.any(axis=(1, 2)))[0].tolist():
        for loop in _midpoint_loops(mask[z]):
            indices.append(z)
            loops.append(loop)
    return [(z, simple) for z, simple in zip(indices, simplify_loops(loops, spacing, tol),
                                             strict=True) if _is_polygon(simple)]


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons by the even-odd rule at pixel centres (the inverse of tracing).

    Parameters
    ----------
    polygons
        ``(n, 2)`` ``(row, column)`` vertex arrays, closed implicitly.
    shape
        ``(rows, columns)`` of the output.

    Returns
    -------
    numpy.ndarray
        Boolean mask; a pixel is set when its centre lies inside an odd number of polygons.
    """
    rows, cols = shape
    toggles = np.zeros((rows, cols + 1), np.int32)
    for poly in polygons:
        y0, x0 = poly[:, 0], poly[:, 1]
        y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
        for ya, xa, yb, xb in zip(y0, x0, y1, x1, strict=True):
            if ya == yb:
                continue
            lo, hi = (ya, yb) if ya < yb else (yb, ya)
            # Pixel-centre rows r with lo <= r < hi (half-open so vertices count once).
            r = np.arange(max(int(np.ceil(lo)), 0), min(int(np.ceil(hi)), rows))
            if r.size == 0:
                continue
            x = xa + (r - ya) * (xb - xa) / (yb - ya)
            c = np.clip(np.ceil(x).astype(int), 0, cols)
            np.add.at(toggles, (r, c), 1)
    return (np.cumsum(toggles, axis=1)[:, :cols] % 2).astype(bool)
