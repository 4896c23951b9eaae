"""Plain NumPy/SciPy implementation of the ECL clustering of cpp/ecl/clustering.hpp.

Same algorithm, same definitions (see the header comment there): used by tests to cross-check
the C++ implementation on the same events and by benchmarks/bench_clustering.py to measure the
speed-up of C++. Vectorised over the whole batch where it is natural (connected regions with
scipy.sparse.csgraph, local maxima, cluster quantities, shapes and images with bincount); the
iterative energy sharing loops in Python over the regions with several maxima.

    from numpy_clustering import find_clusters
    out = find_clusters("array30", offsets, cell, energy, time, quality)

returns the same dict of arrays as ``eclreco._core.find_clusters`` (one detector per call).
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DEFAULTS = dict(seed_energy_gev=0.010, growth_energy_gev=0.0015, digit_energy_gev=0.0005,
                lm_energy_gev=0.010, time_cut_ns=125.0, background_level=0.0, sharing_a=2.5,
                moliere_radius_cm=3.57, log_weight_w0=4.0, convergence_cm=0.01, max_iterations=100,
                lat_r0_cm=5.0, image_size=7, max_local_maxima=30, position_crystals=9)
FEATURES = ("theta", "phi", "local_u", "local_v", "energy_raw", "ring", "region")

_GEOM_CACHE: dict = {}


def _geometry(name: str) -> dict:
    if name not in _GEOM_CACHE:
        import eclreco
        g = eclreco.Geometry.get(name)
        _GEOM_CACHE[name] = dict(
            name=name, belle=name == "belle2-ecl", n_cells=g.n_cells, n_rings=g.n_rings,
            ring_size=np.asarray(g.ring_size, np.int64), ring_first=np.asarray(g.ring_first_cell, np.int64),
            ring_theta=np.asarray(g.ring_theta), ring_lo=np.asarray(g.ring_theta_lo),
            ring_hi=np.asarray(g.ring_theta_hi), cell_ring=np.asarray(g.cell_ring, np.int64),
            cell_phi_index=np.asarray(g.cell_phi_index, np.int64), cell_phi=np.asarray(g.cell_phi),
            pos=np.stack([g.front_x, g.front_y, g.front_z], axis=1),
            n1_off=np.asarray(g.n1_offsets, np.int64), n1=np.asarray(g.n1_cells, np.int64),
            nc2_off=np.asarray(g.nc2_offsets, np.int64), nc2=np.asarray(g.nc2_cells, np.int64))
    return _GEOM_CACHE[name]


def _expand(off: np.ndarray, lists: np.ndarray, cells: np.ndarray):
    """CSR neighbour lists of `cells` (cellIds): (index into cells, neighbour cellId) pairs."""
    lo, hi = off[cells - 1], off[cells]
    n = hi - lo
    owner = np.repeat(np.arange(len(cells)), n)
    start = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return owner, lists[start + np.arange(n.sum())]


def _nearest_phi_index(G, ring_from, phi_from, ring):
    """Vectorised Geometry::nearest_phi_index (same floating-point operations)."""
    n_from, n_to = G["ring_size"][ring_from], G["ring_size"][ring]
    if not G["belle"]:
        return phi_from.copy()
    phi = (phi_from + 0.5) * 2 * np.pi / n_from
    u = phi / (2 * np.pi)
    u = u - np.floor(u)
    p = (u * n_to).astype(np.int64)
    p = np.minimum(p, n_to - 1)
    return np.where(n_from == n_to, phi_from, p)


def _cell_id(G, ring, phi_index):
    """Vectorised Geometry::cell_id: 0 outside."""
    inside = (ring >= 0) & (ring < G["n_rings"])
    r = np.clip(ring, 0, G["n_rings"] - 1)
    n = G["ring_size"][r]
    if G["belle"]:
        p = np.mod(phi_index, n)
    else:
        inside = inside & (phi_index >= 0) & (phi_index < n)
        p = np.clip(phi_index, 0, n - 1)
    return np.where(inside, G["ring_first"][r] + p, 0)


def _log_centroid(share, etot, pos, w0):
    """Log-weighted centroid of one cluster (shares of its digits, positions (m, 3))."""
    w = np.zeros_like(share)
    if etot > 0:
        ok = share > 0
        w[ok] = np.maximum(0.0, w0 + np.log(share[ok] / etot))
    if w.sum() <= 0:
        w = share
        if w.sum() <= 0:
            return pos[0].copy()
    return (w[:, None] * pos).sum(0) / w.sum()


def find_clusters(detector, offsets, cell, energy, time, quality, skip=None, **params) -> dict:
    p = dict(DEFAULTS)
    for k, v in params.items():
        if k not in p:
            raise TypeError(f"unknown parameter '{k}'")
        p[k] = v
    if isinstance(detector, (int, np.integer)):
        detector = ["belle2-ecl", "array30"][int(detector)]
    G = _geometry(detector)
    ncell = G["n_cells"]
    offsets = np.asarray(offsets, np.int64)
    n_events = len(offsets) - 1
    nd = int(offsets[-1])
    cell = np.asarray(cell[:nd], np.int64)
    E = np.asarray(energy[:nd], np.float32).astype(np.float64)
    T = np.asarray(time[:nd], np.float32).astype(np.float64)
    Q = np.asarray(quality[:nd])
    ev = np.repeat(np.arange(n_events), np.diff(offsets))
    valid = (cell >= 1) & (cell <= ncell)
    if skip is not None:
        valid &= ~np.asarray(skip, bool)[ev]

    s = np.sqrt(1.0 + p["background_level"])
    t_seed, t_grow = p["seed_energy_gev"] * s, p["growth_energy_gev"] * s
    t_digit, t_lm = p["digit_energy_gev"] * s, p["lm_energy_gev"] * s
    in_time = valid & ((p["time_cut_ns"] <= 0) | (Q != 0) | (np.abs(T) < p["time_cut_ns"]))
    is_digit = valid & (E >= t_digit)
    is_grow = in_time & is_digit & (E >= t_grow)
    is_seed = is_grow & (E >= t_seed)

    # Digit lookup by (event, cell).
    key = ev * (ncell + 1) + np.where(valid, cell, 0)
    order = np.argsort(key, kind="stable")
    skey = key[order]

    def lookup(ev_q, cell_q):
        k = ev_q * (ncell + 1) + cell_q
        pos = np.minimum(np.searchsorted(skey, k), max(len(skey) - 1, 0))
        found = (len(skey) > 0) & (skey[pos] == k) if len(skey) else np.zeros(len(k), bool)
        return np.where(found, order[pos] if len(order) else -1, -1)

    # 1. Connected regions.
    g_idx = np.flatnonzero(is_grow)
    own, nb = _expand(G["n1_off"], G["n1"], cell[g_idx])
    a = g_idx[own]
    b = lookup(ev[a], nb)
    keep = (b >= 0) & (b != a)
    keep[keep] &= is_digit[b[keep]]
    a, b = a[keep], b[keep]
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(nd, nd))
    _, comp = connected_components(graph, directed=False) if nd else (0, np.zeros(0, np.int64))
    seeds = np.flatnonzero(is_seed)
    seed_comps, first_seed = np.unique(comp[seeds], return_index=True)
    first_seed = seeds[first_seed]
    by_first = np.argsort(first_seed, kind="stable")
    seed_comps, first_seed = seed_comps[by_first], first_seed[by_first]
    n_reg = len(seed_comps)
    reg_event = ev[first_seed]
    # region index within the event = rank of its first seed
    reg_start = np.searchsorted(reg_event, np.arange(n_events))
    reg_local = np.arange(n_reg) - reg_start[reg_event] if n_reg else np.zeros(0, np.int64)
    comp_to_reg = np.full(max(nd, 1), -1, np.int64)
    comp_to_reg[seed_comps] = np.arange(n_reg)
    region = np.where(is_digit, comp_to_reg[comp] if nd else -1, -1)

    # 2. Local maxima.
    cand = np.flatnonzero((region >= 0) & in_time & (E >= t_lm))
    own, nb = _expand(G["n1_off"], G["n1"], cell[cand])
    i = cand[own]
    j = lookup(ev[i], nb)
    ok = (j >= 0) & (j != i)
    jj = np.where(ok, j, 0)
    beaten = ok & ((E[jj] > E[i]) | ((E[jj] == E[i]) & (cell[jj] < cell[i])))
    lost = np.bincount(own[beaten], minlength=len(cand)) > 0
    is_lm = np.zeros(nd, bool)
    is_lm[cand[~lost]] = True
    n_lm = np.bincount(region[is_lm], minlength=n_reg)
    for r in np.flatnonzero(n_lm == 0):  # regions without a maximum: highest seed digit
        mem = np.flatnonzero((region == r) & is_seed)
        best = mem[np.lexsort((cell[mem], -E[mem]))[0]]
        is_lm[best] = True
        n_lm[r] = 1
    for r in np.flatnonzero(n_lm > p["max_local_maxima"]):  # the highest ones (energy, then lower cellId)
        mem = np.flatnonzero((region == r) & is_lm)
        is_lm[mem[np.lexsort((cell[mem], -E[mem]))[p["max_local_maxima"]:]]] = False
        n_lm[r] = p["max_local_maxima"]

    # 3. Clusters as (cluster, digit, weight) pairs.
    members = np.flatnonzero(region >= 0)
    mreg = region[members]
    lms = np.flatnonzero(is_lm)
    lms = lms[np.argsort(region[lms], kind="stable")]
    n_cl = len(lms)
    cl_reg = region[lms]
    cl_nmax = n_lm[cl_reg]
    single = cl_nmax == 1
    reg_to_cl = np.full(max(n_reg, 1), -1, np.int64)
    reg_to_cl[cl_reg[single]] = np.flatnonzero(single)
    sel = reg_to_cl[mreg] >= 0
    pc = [reg_to_cl[mreg[sel]]]
    pd = [members[sel]]
    pw = [np.ones(sel.sum())]
    pos = G["pos"]
    a_rm = p["sharing_a"] / p["moliere_radius_cm"]
    w0 = p["log_weight_w0"]
    for r in np.flatnonzero(n_lm > 1):
        mem = members[mreg == r]
        ks = np.flatnonzero(cl_reg == r)
        lm_d = lms[ks]
        P = pos[cell[mem] - 1]
        Em = E[mem]
        C = pos[cell[lm_d] - 1].copy()
        Ek = E[lm_d].copy()
        for it in range(p["max_iterations"]):
            d = np.sqrt(((P[:, None, :] - C[None, :, :]) ** 2).sum(-1))
            f = Ek[None, :] * np.exp(-a_rm * d)
            ssum = f.sum(1)
            W = np.where(ssum[:, None] > 0, f / np.where(ssum > 0, ssum, 1)[:, None],
                         np.eye(len(ks))[np.argmin(d, axis=1)])
            shares = W * Em[:, None]
            Ek = shares.sum(0)
            Cn = np.stack([_log_centroid(shares[:, k], Ek[k], P, w0) for k in range(len(ks))])
            shift = np.sqrt(((Cn - C) ** 2).sum(1)).max()
            C = Cn
            if shift < p["convergence_cm"]:
                break
        for col, k in enumerate(ks):
            pc.append(np.full(len(mem), k))
            pd.append(mem)
            pw.append(W[:, col])
    pc, pd, pw = np.concatenate(pc).astype(np.int64), np.concatenate(pd), np.concatenate(pw)
    o = np.lexsort((pd, pc))
    pc, pd, pw = pc[o], pd[o], pw[o]
    share = pw * E[pd]
    ppos = pos[cell[pd] - 1]

    # 4. Cluster quantities.
    e_cl = np.bincount(pc, share, minlength=n_cl)
    wsum = np.bincount(pc, pw, minlength=n_cl)
    seed_cell = cell[lms]
    pkey = pc * (ncell + 1) + cell[pd]

    def in_lists(off, lists):  # the pairs whose digit is in the list (N1, NC2) of its cluster's seed
        own_, nb_ = _expand(off, lists, seed_cell)
        return np.isin(pkey, own_ * (ncell + 1) + nb_)

    in_n1, in_nc2 = in_lists(G["n1_off"], G["n1"]), in_lists(G["nc2_off"], G["nc2"])
    # position: log weights over the cluster's crystals (0) or its seed's 3 x 3 (9) / 21 crystals
    ps = share * {0: np.ones(len(pc), bool), 9: in_n1, 21: in_nc2}[p["position_crystals"]]
    e_pos = np.bincount(pc, ps, minlength=n_cl)
    lw = np.zeros_like(share)
    okw = ps > 0
    lw[okw] = np.maximum(0.0, w0 + np.log(ps[okw] / e_pos[pc[okw]]))
    lw_sum = np.bincount(pc, lw, minlength=n_cl)
    fallback = lw_sum <= 0
    lw = np.where(fallback[pc], ps, lw)
    lw_sum = np.bincount(pc, lw, minlength=n_cl)
    cen = np.stack([np.bincount(pc, lw * ppos[:, k], minlength=n_cl) for k in range(3)], 1)
    cen = cen / np.where(lw_sum > 0, lw_sum, 1)[:, None]
    sc = seed_cell - 1
    ring = G["cell_ring"][sc]
    x, y, z = cen[:, 0], cen[:, 1], cen[:, 2]
    if G["belle"]:
        theta = np.arctan2(np.sqrt(x * x + y * y), z)
        phi = np.arctan2(y, x)
        u = (theta - G["ring_theta"][ring]) / (G["ring_hi"][ring] - G["ring_lo"][ring])
        dphi = np.mod(phi - G["cell_phi"][sc] + np.pi, 2 * np.pi) - np.pi
        v = dphi / (2 * np.pi / G["ring_size"][ring])
        region_code = np.where(ring < 13, 0, np.where(ring < 59, 1, 2))
    else:
        pitch = pos[1, 0] - pos[0, 0]
        theta = np.zeros(n_cl)
        phi = np.arctan2(y, x)
        u = (y - pos[sc, 1]) / pitch
        v = (x - pos[sc, 0]) / pitch
        region_code = np.zeros(n_cl, np.int64)

    # 5. Shapes.
    e9 = np.bincount(pc[in_n1], share[in_n1], minlength=n_cl)
    e21 = np.bincount(pc[in_nc2], share[in_nc2], minlength=n_cl)
    e1 = np.bincount(pc[pd == lms[pc]], share[pd == lms[pc]], minlength=n_cl)
    e1e9 = np.where(e9 > 0, e1 / np.where(e9 > 0, e9, 1), 0.0)
    e9e21 = np.where(e21 > 0, e9 / np.where(e21 > 0, e21, 1), 0.0)
    dvec = ppos - cen[pc]
    if G["belle"]:
        nvec = cen / np.linalg.norm(cen, axis=1)[:, None]
    else:
        nvec = np.tile([0.0, 0.0, 1.0], (n_cl, 1))
    dn = (dvec * nvec[pc]).sum(1)
    r2 = np.maximum(0.0, (dvec ** 2).sum(1) - dn * dn)
    er2 = np.bincount(pc, share * r2, minlength=n_cl)
    m2 = np.where(e_cl > 0, er2 / np.where(e_cl > 0, e_cl, 1), 0.0)
    o2 = np.lexsort((cell[pd], -share, pc))
    rank = np.arange(len(o2)) - np.searchsorted(pc[o2], pc[o2])
    top = o2[rank < 2]
    top_e = np.bincount(pc[top], share[top], minlength=n_cl)
    top_er2 = np.bincount(pc[top], share[top] * r2[top], minlength=n_cl)
    n_mem = np.bincount(pc, minlength=n_cl)
    num = er2 - top_er2
    den = num + p["lat_r0_cm"] ** 2 * top_e
    lat = np.where((n_mem >= 2) & (den > 0), np.maximum(0.0, num) / np.where(den > 0, den, 1), 0.0)

    # 6. Images.
    N = p["image_size"]
    h = N // 2
    dr = np.arange(N) - h
    rr = ring[:, None] + dr[None, :]
    rr_c = np.clip(rr, 0, G["n_rings"] - 1)
    centre = _nearest_phi_index(G, np.repeat(ring[:, None], N, 1), np.repeat(G["cell_phi_index"][sc][:, None], N, 1), rr_c)
    ids = _cell_id(G, rr[:, :, None], centre[:, :, None] + (np.arange(N) - h)[None, None, :])
    ikey = np.arange(n_cl)[:, None, None] * (ncell + 1) + ids
    po = np.argsort(pkey)
    spk = pkey[po]
    loc = np.minimum(np.searchsorted(spk, ikey), max(len(spk) - 1, 0))
    found = (ids > 0) & (spk[loc] == ikey) if len(spk) else np.zeros(ikey.shape, bool)
    image = np.where(found, share[po[loc]] if len(po) else 0.0, 0.0)

    # Sort by event, energy descending, seed cell.
    cl_event = ev[lms]
    so = np.lexsort((seed_cell, -e_cl, cl_event))
    out_offsets = np.concatenate([[0], np.cumsum(np.bincount(cl_event, minlength=n_events))]).astype(np.int64)
    f32 = lambda a: np.asarray(a, np.float64)[so].astype(np.float32)  # noqa: E731
    i32 = lambda a: np.asarray(a)[so].astype(np.int32)  # noqa: E731
    features = np.stack([theta, phi, u, v, e_cl, ring.astype(np.float64), region_code.astype(np.float64)], 1)
    return dict(
        offsets=out_offsets, energy_raw=f32(e_cl), theta=f32(theta), phi=f32(phi), x=f32(x), y=f32(y), z=f32(z),
        time=f32(np.where(Q[lms] == 0, T[lms], 0.0)), e1e9=f32(e1e9), e9e21=f32(e9e21), second_moment=f32(m2), lat=f32(lat),
        local_u=f32(u), local_v=f32(v), weight_sum=f32(wsum), n_crystals=i32(np.rint(wsum)),
        seed_cell=i32(seed_cell), ring=i32(ring), n_maxima=i32(cl_nmax), region_index=i32(reg_local[cl_reg]),
        image=image[so].astype(np.float32), features=features[so].astype(np.float32))
