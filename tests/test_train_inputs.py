"""`eclreco train`'s inputs refused before any work: a training-set cache (--cache) that cannot be what the
command asks for."""
import os
import re

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ARRAY30 = os.path.join(HERE, "data", "g4_array30_subset.npz")  # 2000 events


def _cache(path, max_events, **drop):
    """A cache of the array30 subset's chain samples that records `max_events`, as save_samples writes it;
    drop: sample keys to leave out (as an older eclreco wrote them)."""
    from eclreco import train

    samples = train.chain_samples("array30", ARRAY30, quiet=True)
    for s in samples:
        for key in drop:
            del s[key]
    train.save_samples(str(path), samples, train.cache_provenance("array30", ARRAY30, max_events))


def test_a_cache_whose_max_events_exceeds_its_geant4_file_is_refused(tmp_path, capsys):
    """A cache made by a build that did not check --max-events against the file (5000 of a 2000-event file)
    was read without a word: the training ran on the 2000 events and the card recorded '--max-events 5000' in
    its command, which the current eclreco refuses, so the card's command did not train its network again.
    It is one line naming the cache, the file and its event count now, exit 2, and no -o folder."""
    pytest.importorskip("torch")
    from eclreco import cli

    cache = tmp_path / "chain.npz"
    _cache(cache, 5000)
    out = tmp_path / "out"
    assert cli.main(["train", "--detector", "array30", "-o", str(out), "--g4", ARRAY30, "--cache", str(cache),
                     "--max-events", "5000", "--sizes", "tiny", "--epochs", "1", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"eclreco train: error: the cache {str(cache)!r} was made with --max-events 5000, but the Geant4 file "
        f"{ARRAY30!r} holds 2000 events: remove the cache and run again with --max-events 2000 or fewer (0: all "
        "of them)\n")
    assert not out.exists() and cache.exists()


def test_a_cache_without_its_chain_seed_says_the_command_that_remakes_it(tmp_path, capsys):
    """A cache written before the samples recorded their chain seed was refused with 'use another --cache file',
    which did not say that removing it and running again remakes it. The line now gives that command; the
    refusal exits 2 before any work (no -o folder, the cache untouched), and doing what it says trains."""
    pytest.importorskip("torch")
    from eclreco import cli

    cache = tmp_path / "old chain.npz"  # (a space: the rm command quotes the path)
    _cache(cache, 0, chain_seed=None)
    made = cache.read_bytes()
    out = tmp_path / "out"
    argv = ["train", "--detector", "array30", "-o", str(out), "--g4", ARRAY30, "--cache", str(cache), "--sizes", "tiny",
            "--epochs", "1", "--quiet"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"eclreco train: error: the cache {str(cache)!r} does not record its chain sample's seed (written by an older "
        f"eclreco): remove it (rm '{cache}') and run this command again, which remakes it, or use another --cache "
        "file\n")
    assert not out.exists() and cache.read_bytes() == made
    cache.unlink()  # as it says
    assert cli.main(argv) == 0
    assert (out / "array30.onnx").exists() and cache.exists()


def _sample(tmp_path, name, **arrays):
    """A small array30 Geant4 sample (the subset's first 1000 events) with some arrays replaced, as a file."""
    with np.load(ARRAY30) as f:
        off = f["offsets"][:1001]
        d = dict(true_energy_mev=f["true_energy_mev"][:1000], xy_mm=f["xy_mm"][:1000], offsets=off,
                 cell=f["cell"][: off[-1]], edep_mev=f["edep_mev"][: off[-1]])
    path = tmp_path / f"{name}.npz"
    np.savez(path, **{**d, **arrays})
    return str(path)


def _refused(tmp_path, capsys, path, detector, message, commands=("train", "validate")):
    """G4Sample refuses `path` with `message` (a pattern) after the file's name, and so does each of `commands`:
    exit 2, one line."""
    from eclreco import cli, cnn_data

    with pytest.raises(ValueError, match=f"{os.path.basename(path)}: {message}"):
        cnn_data.G4Sample(path, detector)
    for command in commands:
        assert cli.main([command, "--detector", detector, "-o", str(tmp_path / "out"), "--g4", path, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(f"eclreco {command}: error: .*{message}", err)


def test_a_geant4_sample_with_out_of_range_cells_or_entry_points_is_refused(tmp_path, capsys):
    """Two wrong samples were read as right ones: int64 cellIds above 2**31 (a packed volume ID, 2**32 + 403)
    were cast to int32 before the range check, which then saw their low bits (403) and trained on them; a NaN
    entry point (xy_mm) was counted outside the aluminium gaps in validate's gap truth. Each is one line naming
    the array, from G4Sample and from the command, before any work (no -o folder)."""
    from eclreco import cnn_data

    with np.load(ARRAY30) as f:
        cell, xy = f["cell"][: f["offsets"][1000]].astype(np.int64), f["xy_mm"][:1000].copy()
    xy[7] = np.nan
    cases = [("packed", dict(cell=cell + 2 ** 32),  # (cellIds 58..766)
              r"cellIds 4294967354\.\.4294968062 are not those of array30 \(1\.\.900\)"),
             ("xynan", dict(xy_mm=xy),
              r"'xy_mm' gives 1 photon\(s\) an entry point that is not finite \(the first \[nan, nan\] mm, event 7\)")]
    for name, arrays, message in cases:
        path = _sample(tmp_path, name, **arrays)
        _refused(tmp_path, capsys, path, "array30", message)
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(_sample(tmp_path, "good"), "array30").n == 1000


def test_a_geant4_sample_of_ragged_or_mismatched_arrays_names_the_array(tmp_path, capsys):
    """Deposits saved as a list of per-event arrays (an object array) were refused with numpy's 'Object arrays
    cannot be loaded when allow_pickle=False', and arrays of different lengths with '1999 photons, 2001 offsets
    (0..46906), 46906 cellIds, 46906 deposits do not fit together': neither named the array to fix. Each line
    names it now (and says what a flat array with offsets is), from the command too, before any work."""

    with np.load(ARRAY30) as f:
        off = f["offsets"][:1001]
        true, cell, edep = f["true_energy_mev"][:1000], f["cell"][: off[-1]], f["edep_mev"][: off[-1]]
    ragged = np.empty(1000, object)
    ragged[:] = [edep[a:b] for a, b in zip(off[:-1], off[1:])]
    down = off.copy()
    down[5] = down[7] + 3
    cases = [("ragged", dict(edep_mev=ragged), r"'edep_mev' holds Python objects \(a list of arrays per event\?\), not "
              r"an array of numbers: one flat array for all events, their boundaries in 'offsets'"),
             ("short", dict(true_energy_mev=true[:-1]), r"'offsets' holds 1001 event boundaries, not 1000 \(one more "
              r"than the 999 photons of 'true_energy_mev'\)"),
             ("start", dict(offsets=off + 1), r"'offsets' begins at 1, not 0"),
             ("end", dict(cell=cell[:-1], edep_mev=edep[:-1]), rf"'offsets' ends at {off[-1]}, but 'cell' holds "
              rf"{off[-1] - 1} entries"),
             ("edep", dict(edep_mev=edep[:-1]), rf"'edep_mev' holds {off[-1] - 1} entries, 'cell' {off[-1]}"),
             ("down", dict(offsets=down), rf"'offsets' decreases at event 5 \({down[5]} then {down[6]}\)")]
    for name, arrays, message in cases:
        path = _sample(tmp_path, name, **arrays)
        _refused(tmp_path, capsys, path, "array30", message, ("train",))
    assert not (tmp_path / "out").exists()


def test_a_geant4_sample_with_entry_points_in_cm_is_refused_naming_the_array_and_the_unit(tmp_path, capsys):
    """array30 entry points (xy_mm) written in cm, 10x too small, were read as mm: a third of the photons then
    'entered' the aluminium gap at x or y = 0 in validate's gap truth. The deposits' energy centroid says where
    each photon entered: such a file is one line naming the array and the unit, from G4Sample and from train
    and validate, before any work; the file in mm passes."""
    from eclreco import cnn_data

    with np.load(ARRAY30) as f:
        xy = f["xy_mm"][:1000]
    path = _sample(tmp_path, "xycm", xy_mm=xy / 10)
    message = (r"'xy_mm' puts the photons' entry points a median 3\d\.\d mm from the energy centroid of their "
               r"deposits, 1\d\.\d mm if they were cm: are they in cm\? The file holds them in mm")
    _refused(tmp_path, capsys, path, "array30", message)
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(_sample(tmp_path, "good"), "array30").n == 1000


def test_offsets_beyond_int64_are_named_as_the_file_holds_them(tmp_path, capsys):
    """G4Sample cast 'offsets' to int64 before checking it: a uint64 boundary near 2**64 wrapped to -3 and a
    float one of 1e20 (or 2**63) to -2**63, and the refusal named those values, which the file does not hold
    ('decreases at event 4 (76 then -3)'). 'offsets' is checked as stored now: a boundary outside the entries of
    'cell' is named with its value and index, a decrease of a uint64 array (where np.diff wraps) with its values;
    uint64 offsets that fit pass."""
    from eclreco import cnn_data

    with np.load(ARRAY30) as f:
        off = f["offsets"][:1001]
    n = int(off[-1])
    wrap, huge, down = off.astype(np.uint64), off.astype(np.float64), off.astype(np.uint64)
    wrap[5] = 2 ** 64 - 3
    huge[5] = 1e20
    down[5] = down[7] + 3
    cases = [("wrap", wrap, rf"'offsets' holds 18446744073709551613 at event boundary 5, outside the 0\.\.{n} entries "
              "of 'cell'"),
             ("huge", huge, rf"'offsets' holds 100000000000000000000 at event boundary 5, outside the 0\.\.{n} "
              "entries of 'cell'"),
             ("down", down, rf"'offsets' decreases at event 5 \({down[5]} then {down[6]}\)")]
    for name, offsets, message in cases:
        path = _sample(tmp_path, name, offsets=offsets)
        _refused(tmp_path, capsys, path, "array30", message, ("train",))
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(_sample(tmp_path, "uint64", offsets=off.astype(np.uint64)), "array30").n == 1000


def test_the_max_events_check_of_a_cache_reads_the_geant4_files_length_only(tmp_path, capsys):
    """`eclreco train --cache` checked the cache's --max-events against the Geant4 file by reading and checking
    the whole file (G4Sample): for a 1 GB sample seconds and several GB of memory, for one number. It reads the
    length from the true-energy array's header now: refusing a cache of more events than a 100 000-event file
    holds takes less memory than the file's deposits alone, and the refusal (and that of a cache made with
    another --max-events) is as before."""
    import tracemalloc

    pytest.importorskip("torch")
    import onnx  # noqa: F401  (run_training imports both: their import is no part of the check)
    import torch  # noqa: F401
    from eclreco import cli, train

    with np.load(ARRAY30) as f:  # the subset 50 times over: 100 000 events, 1.2 M deposits
        d = {k: f[k] for k in f.files}
    k = 50
    counts = np.tile(np.diff(d["offsets"]), k)
    big = dict(true_energy_mev=np.tile(d["true_energy_mev"], k), xy_mm=np.tile(d["xy_mm"], (k, 1)),
               offsets=np.concatenate([[0], np.cumsum(counts)]), cell=np.tile(d["cell"], k),
               edep_mev=np.tile(d["edep_mev"], k))
    g4 = tmp_path / "big.npz"
    np.savez(g4, **big)
    deposit_bytes = big["cell"].nbytes + big["edep_mev"].nbytes
    samples = train.chain_samples("array30", ARRAY30, max_events=300, quiet=True)
    out = tmp_path / "out"
    for made_with, asked, message in [
            (200000, 200000, f"was made with --max-events 200000, but the Geant4 file {str(g4)!r} holds 100000 "
                             "events: remove the cache and run again with --max-events 100000 or fewer"),
            (5000, 6000, "was made with --max-events 5000, not 6000: remove it")]:
        cache = tmp_path / f"chain{made_with}.npz"
        train.save_samples(str(cache), samples, train.cache_provenance("array30", str(g4), made_with))
        tracemalloc.start()
        try:
            assert cli.main(["train", "--detector", "array30", "-o", str(out), "--g4", str(g4), "--cache", str(cache),
                             "--max-events", str(asked), "--sizes", "tiny", "--epochs", "1", "--quiet"]) == 2
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        err = capsys.readouterr().err
        assert err.startswith(f"eclreco train: error: the cache {str(cache)!r} {message}") and err.count("\n") == 1
        assert peak < deposit_bytes, (peak, deposit_bytes)
    assert not out.exists()


def test_true_energies_out_of_step_with_the_deposits_are_refused(tmp_path, capsys):
    """True energies in another order than the events' deposits (one array sorted or shuffled, files merged in
    another order) passed every check, the median deposited fraction included (0.74 for array30, 0.96 for
    belle2-ecl, within 0.05-2), and trained on targets of other photons. An event cannot deposit more than its
    photon's energy: 43-47 % of such events do, which is one line naming the array and the first event, from
    G4Sample and from the commands, before any work; the files in step pass."""
    from eclreco import cnn_data

    rng = np.random.default_rng(5)
    belle2 = os.path.join(HERE, "data", "g4_belle2_subset.npz")
    with np.load(belle2) as f:
        ph = f["photons"]
    with np.load(ARRAY30) as f:
        true = f["true_energy_mev"][:1000]
    cases = [("array30", _sample(tmp_path, "shuffled", true_energy_mev=rng.permutation(true)), "'true_energy_mev'"),
             ("belle2-ecl", str(tmp_path / "b2shuffled.npz"), r"'photons' \[:, 0, 0\]")]
    with np.load(belle2) as f:
        np.savez(cases[1][1], **{**{k: f[k] for k in f.files}, "photons": ph[rng.permutation(len(ph))]})
    for det, path, name in cases:
        message = (rf"\d+ event\(s\) deposit more than their photon's true energy \({name}\), which energy conservation "
                   r"forbids \(the first, event \d+: [\d.]+ MeV of [\d.]+ MeV\): are the true energies in the order of "
                   "the events' deposits")
        _refused(tmp_path, capsys, path, det, message)
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(ARRAY30, "array30").n == 2000 and cnn_data.G4Sample(belle2, "belle2-ecl").n == 2000


def test_entry_points_away_from_their_deposits_are_refused(tmp_path, capsys):
    """An array30 sample with cellIds counted from 0 passed the range check (the corner crystal, 0 then, is never
    hit by the reference beam), so every deposit lay one crystal off its photon's entry point; entry points of
    zeros (a placeholder) put the photons in the aluminium gap at the origin in validate's gap truth. Entry points
    a median more than half a crystal pitch from their deposits' energy centroid are one line naming 'xy_mm',
    from G4Sample and the commands, before any work."""
    from eclreco import cnn_data

    with np.load(ARRAY30) as f:
        cell, xy = f["cell"][: f["offsets"][1000]], f["xy_mm"][:1000]
    message = (r"'xy_mm' puts the photons' entry points a median {} mm from the energy centroid of their deposits, "
               r"more than 30 mm \(half the crystal pitch\): entry points of other events, or cellIds \('cell'\) "
               r"counted from 0, not 1\?")
    for name, arrays, median in [("from0", dict(cell=cell - 1), r"6\d\.\d"), ("zeros", dict(xy_mm=0 * xy), r"4\d\.\d")]:
        path = _sample(tmp_path, name, **arrays)
        _refused(tmp_path, capsys, path, "array30", message.format(median), ("train",))
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(_sample(tmp_path, "good"), "array30").n == 1000


def test_cells_counted_from_0_are_refused_without_entry_points(tmp_path, capsys):
    """Without xy_mm (the held-out file has none) an array30 sample with cellIds counted from 0 passed every
    check: the corner crystal, 0 then, is never hit by the reference beam, and nothing compared the deposits
    with a place. Their energy centroid a median more than half a crystal pitch from the reference beam's
    crystal (61 mm shifted, 9.8 mm as shipped) is one line naming 'cell', from G4Sample and the commands."""
    from eclreco import cnn_data

    heldout = os.path.join(HERE, "data", "g4_array30_heldout.npz")
    with np.load(heldout) as f:
        d = {k: f[k] for k in f.files}
    assert "xy_mm" not in d
    path = str(tmp_path / "from0.npz")
    np.savez(path, **{**d, "cell": d["cell"] - 1})
    message = (r"the energy centroid of the events' deposits \('cell'\) lies a median 6\d\.\d mm from the centre of "
               r"the reference beam's crystal \(x, y = 30, 30 mm: col 15, row 15\), more than 30 mm \(half the "
               r"crystal pitch\): cellIds counted from 0, not 1, or a beam elsewhere\?")
    _refused(tmp_path, capsys, path, "array30", message)
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(heldout, "array30").n == 2000


def test_photon_directions_away_from_their_deposits_are_refused(tmp_path, capsys):
    """belle2-ecl directions in another frame (z reversed, x and y swapped) passed the unit-vector check; the chain
    then matched a cluster to the 4-6 % of the photons near the symmetry plane only, and train ran on those
    without a word. More than 10 % of the photons directed more than the matching cone from their deposits'
    energy centroid is one line naming 'photons', from G4Sample and the commands, before any work."""
    from eclreco import cnn_data

    belle2 = os.path.join(HERE, "data", "g4_belle2_subset.npz")
    with np.load(belle2) as f:
        d = {k: f[k] for k in f.files}
    flipped, swapped = d["photons"].copy(), d["photons"].copy()
    flipped[:, 0, 3] *= -1
    swapped[:, 0, 1:3] = swapped[:, 0, 2:0:-1]
    message = (r"'photons' gives \d+\.\d% of the photons a direction more than 0.1 rad \(the cluster matching's cone\) "
               r"from the energy centroid of their deposits, which the chain would leave without a matched cluster "
               r"\(at most 10%\): directions of other events, or in another frame")
    for name, photons in [("flipped", flipped), ("swapped", swapped)]:
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **{**d, "photons": photons})
        _refused(tmp_path, capsys, path, "belle2-ecl", message)
    assert not (tmp_path / "out").exists()
    assert cnn_data.G4Sample(belle2, "belle2-ecl").n == 2000
