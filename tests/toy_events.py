"""Tiny toy event generator for the clustering tests (not a simulation: exponential lateral
profiles around impact points, Gaussian noise, zero suppression, random background digits)."""
from __future__ import annotations

import numpy as np

import eclreco


def shower_cells(geom, impact, energy_gev, rng, lam_cm=1.6, tail=0.05, containment=0.95, half=3):
    """Cells and energies of one toy shower with its axis through `impact` (a front-face point)."""
    pos = np.stack([geom.front_x, geom.front_y, geom.front_z], 1)
    hit = int(np.argmin(((pos - impact) ** 2).sum(1))) + 1
    ring, phi = int(geom.cell_ring[hit - 1]), int(geom.cell_phi_index[hit - 1])
    cells = []
    for dr in range(-half, half + 1):
        r = ring + dr
        if r < 0 or r >= geom.n_rings:
            continue
        c = geom.nearest_phi_index(ring, phi, r) if hasattr(geom, "nearest_phi_index") else None
        if c is None:
            c = geom.phi_index_at(r, float(geom.cell_phi[hit - 1])) if geom.name == "belle2-ecl" else phi
        for dp in range(-half, half + 1):
            cid = geom.cell_id(r, c + dp)
            if cid > 0:
                cells.append(cid)
    cells = np.unique(np.array(cells, np.int64))
    d = np.sqrt(((pos[cells - 1] - impact) ** 2).sum(1))
    w = np.exp(-d / lam_cm) + tail * np.exp(-d / 5.0)
    e = energy_gev * containment * w / w.sum() * rng.normal(1.0, 0.02)
    return cells, e


def make_events(detector, n_events, rng, n_showers=(1, 3), energy=(0.1, 2.0), n_background=250,
                overlap=True, noise_gev=0.00025, zs_gev=0.00125,
                bkg_offset_gev=0.0, bkg_mean_gev=0.002, bkg_tail_frac=0.03, bkg_tail_mean_gev=0.02):
    """Events with toy showers + background; returns offsets, cell, energy, time, quality (dict)."""
    g = eclreco.Geometry.get(detector)
    pos = np.stack([g.front_x, g.front_y, g.front_z], 1)
    offs, cl, en, tm, q = [0], [], [], [], []
    for _ in range(n_events):
        acc = {}
        tacc = {}
        k = rng.integers(n_showers[0], n_showers[1] + 1)
        first = None
        for s in range(k):
            if overlap and first is not None and rng.random() < 0.5:
                # a second shower 1.5 - 3 crystals away from the first
                dirv = rng.normal(size=3)
                impact = first + dirv / np.linalg.norm(dirv) * rng.uniform(7, 15)
                if detector == "belle2-ecl":
                    pass
                else:
                    impact[2] = 0.0
            else:
                impact = pos[rng.integers(0, g.n_cells)] + rng.uniform(-2, 2, 3) * (detector != "belle2-ecl")
                if detector == "array30":
                    impact[2] = 0.0
            if first is None:
                first = impact.copy()
            e0 = np.exp(rng.uniform(np.log(energy[0]), np.log(energy[1])))
            cells, e = shower_cells(g, impact, e0, rng)
            for c, x in zip(cells, e):
                acc[c] = acc.get(c, 0.0) + x
                tacc[c] = rng.normal(0, 2.0)
        nb = rng.poisson(n_background)
        for c in rng.integers(1, g.n_cells + 1, nb):
            x = bkg_offset_gev + (rng.exponential(bkg_mean_gev) if rng.random() >= bkg_tail_frac
                                 else rng.exponential(bkg_tail_mean_gev))
            acc[c] = acc.get(c, 0.0) + x
            tacc.setdefault(c, rng.uniform(-1000, 1000))
        cells = np.array(sorted(acc), np.int64)
        e = np.array([acc[c] for c in cells]) + rng.normal(0, noise_gev, len(cells))
        keep = e >= zs_gev
        cells, e = cells[keep], e[keep]
        t = np.array([tacc[c] for c in cells])
        qual = np.where(e < 0.002, 2, 0).astype(np.uint8)
        offs.append(offs[-1] + len(cells))
        cl.append(cells); en.append(e); tm.append(t); q.append(qual)
    return dict(offsets=np.array(offs, np.int64), cell=np.concatenate(cl).astype(np.int32),
                energy=np.concatenate(en).astype(np.float32), time=np.concatenate(tm).astype(np.float32),
                quality=np.concatenate(q).astype(np.uint8))
