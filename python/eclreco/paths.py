"""Files of the source tree (steering files) and beside it (../shared), found from an installed package;
the checks of input files and of the folders of outputs; outputs written whole (a temporary name, then the
file's own)."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import stat
import sys


def find_beside_package(relative: str) -> str | None:
    """The first existing `base/relative` with base the working directory, then every ancestor of
    this package's directory (nearest first): finds the source tree of an in-tree .venv, where
    `make` installs the package (not editable). None if there is none."""
    bases = [os.getcwd()]
    d = os.path.dirname(os.path.abspath(__file__))
    while os.path.dirname(d) != d:
        bases.append(d)
        d = os.path.dirname(d)
    for base in bases:
        cand = os.path.normpath(os.path.join(base, relative))
        if os.path.exists(cand):
            return cand
    return None


def missing_folder(path: str) -> str:
    """The folder of an output file when it does not exist ('' when it does): a misspelt one is an
    error (RootOutput's at initialize, reco.py's and hlt run's at the command line), not a new
    directory tree."""
    folder = os.path.dirname(os.path.abspath(path))
    return "" if os.path.isdir(folder) else folder


def output_file_error(path: str, option: str) -> str:
    """Why `path` cannot be an output file of `option` (a line naming both), '' when it can be: a directory
    (a name in it is meant), a file in a folder that does not exist (missing_folder) or in one where no file
    can be made (unwritable_folder: the file, or its temporary name, is made there), refused before the work,
    not by the write at its end (reco.py's RootOutput failed at initialize, exit 1, naming no option; an hlt
    collector at its first flush, after it had registered). A pipe or a device is written as it is
    (quarantine --extract /dev/stdout): nothing is made beside it."""
    if os.path.isdir(path):
        return f"{option} {path!r} is a directory: name a file in it"
    if folder := missing_folder(path):
        return f"{option} {path!r}: no directory {folder!r}"
    if os.path.exists(path) and not os.path.isfile(path):
        return ""
    if why := unwritable_folder(os.path.dirname(os.path.realpath(path))):  # a symlink's target is written
        return f"{option} {path!r}: {why}"
    return ""


def output_folder_error(path: str, option: str = "-o") -> str:
    """Why `path` cannot be the folder of a command's outputs (a line naming `option` and the path), '' when
    it can: it is a folder, or one that can be made in a folder that exists, and files can be made in it.
    Only the last component is ever made, as an output file must be in a folder that exists: a typo above it
    (/data/rnus/x) is an error, not a new directory tree."""
    if not path:
        return f"{option} '': no directory named (. for this one)"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{option} {path!r} is not a directory"
    if folder := missing_folder(path):
        return f"{option} {path!r}: no directory {folder!r}"
    if why := unwritable_folder(path):  # at once, not at the first output after hours of training
        return f"{option} {path!r}: {why}"
    return ""


@contextlib.contextmanager
def output_folder(path: str, option: str = "-o"):
    """The folder of a command's outputs (`option` names it in errors), checked (output_folder_error) and
    made on entering, before the work (a path that cannot be one fails at once, not after it); an error or
    an interrupt inside the block removes it again if it made it and it is still empty, so that a failed
    command leaves no new empty folder behind."""
    if why := output_folder_error(path, option):
        raise ValueError(why)
    made = not os.path.isdir(path)
    if made:
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by another process: its, not ours to remove
            made = False
        except OSError as err:
            raise ValueError(f"{option} {path!r}: cannot make the directory ({err.strerror})") from None
    try:
        yield path
    except BaseException:
        if made:
            try:
                os.rmdir(path)
            except OSError:  # not empty (or gone): what is in it stays
                pass
        raise


_PARTIALS = itertools.count(1)  # (next() is atomic in CPython: threads get their own numbers too)


def partial_name(final: str) -> str:
    """A new file beside `final` for its content, which then takes the name with os.replace: so that an
    interrupted or failed run never leaves a half-written file, or one that does not belong with the files
    beside it, under an output's name. It keeps final's extension (matplotlib takes the format from it).
    Each call gives another name (.stem.PID.N.partial.ext): two runs of one process that write the same output
    (two validations into one -o) each have their own file, not one that the second publishes or removes for both.
    (Not tempfile.mkstemp: its files are 0600, and a model, a cache or a plot is for others to read too.)"""
    folder, name = os.path.split(os.path.abspath(final))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.{os.getpid()}.{next(_PARTIALS)}.partial{ext}")


class OutputsChangedError(ValueError):
    """StagedOutputs.publish(unchanged=...): an output's name holds another file than at the run's overwrite check."""


def output_states(paths) -> dict[str, str | None]:
    """{path: its state} of the outputs a run will write, taken with its overwrite check (before it): the SHA-256 of a
    file, '' for something else under the name, None where there is nothing; StagedOutputs.publish(unchanged=)
    replaces only what is still so."""
    return {p: file_sha256(p) if os.path.isfile(p) else "" if os.path.lexists(p) else None for p in paths}


class StagedOutputs:
    """Output files written whole at the end: path(final) is the temporary file (partial_name) that holds
    final's content until publish() gives them all their names; leaving the `with` block removes what
    was not published, so that an interrupted or failed run leaves the outputs as they were (unless publish
    refused to write over a changed output: then they stay, its error names them)."""

    def __init__(self):
        self.files: dict[str, str] = {}  # final name -> temporary file
        self.kept = False  # publish refused: the temporary files stay (a long run's work), named in its error

    def path(self, final: str) -> str:
        if final not in self.files:  # its own file, named once (partial_name gives a new name each call)
            self.files[final] = partial_name(final)
        return self.files[final]

    def publish(self, unchanged: dict[str, str | None] | None = None, run: str = "run") -> None:
        """Gives the files their names. unchanged: output_states at the run's overwrite check, which may have been
        long before (a training): a name that holds another file now (a second run into the folder, a user's file)
        is not written over; OutputsChangedError names them, nothing is published and the temporary files are kept.
        A name free at the check is taken with os.link, which never replaces: a file made there in the instant
        between the check here and the link is not lost either."""
        if unchanged is not None:
            if changed := [f for f, state in output_states(self.files).items() if state != unchanged.get(f)]:
                self._refuse(changed, run)
        free = [] if unchanged is None else [f for f in self.files if unchanged.get(f) is None]
        linked = []
        for final in free:
            try:
                os.link(self.files[final], final)
            except FileExistsError:  # made since the check above: this call's links undone, the set goes whole
                for done in linked:
                    with contextlib.suppress(OSError):
                        if os.path.samefile(done, self.files[done]):
                            os.unlink(done)
                self._refuse([final], run)
            except OSError:  # a file system without hard links: checked above, replaced below
                continue
            linked.append(final)
        for final, tmp in self.files.items():
            if final in linked:
                os.unlink(tmp)
            else:
                os.replace(tmp, final)

    def _refuse(self, changed, run):
        self.kept = True
        names = ", ".join(os.path.basename(f) for f in changed)
        kept = ", ".join(os.path.basename(t) for t in self.files.values())
        if len(self.files) == 1:  # one output file (hlt merge -o, quarantine --extract, a raw file), not a folder's set
            raise OutputsChangedError(
                f"{names} appeared or changed there since this {run} began (another {run}'s output?): not written over; "
                f"this {run}'s output is kept as {kept} (rename it to use it)")
        raise OutputsChangedError(
            f"{names} appeared or changed there since this {run} began (another {run} into the folder?): not written "
            f"over, nothing of this {run} published; its files are kept as {kept} (rename them to use them)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.kept:
            return
        for tmp in self.files.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def one_line(err: Exception) -> str:
    """An error's text on one line, for a refusal that names a file (uproot's, matplotlib's and json's messages run
    over several): eclreco dqm's and hlt merge's."""
    return " ".join(str(err).split())


def unreadable_file(path: str, what: str = "file") -> str:
    """Why `path` cannot be read as a `what` ('' when it can), to follow `OPTION 'path': ` in a refusal:
    open's OSError ('[Errno 21] Is a directory: ...') names neither the option nor what was expected."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as err:  # a path through a file, a loop of links, ...
        return f"cannot read it ({err.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return f"a directory, not a {what}"
    if stat.S_ISREG(st.st_mode):  # opened to know (os.access says yes to root); a pipe is read once, later
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            return f"cannot read it ({err.strerror})"
    return ""


def unwritable_folder(folder: str) -> str:
    """Why files cannot be made in `folder`, or, where it is missing, in the nearest folder above it (where
    it would be made); '' when they can. Said before a long job, not by its first output at the end. A file
    is made there and removed: os.access says yes to root for a read-only file system or an immutable folder."""
    base = os.path.abspath(folder)
    while not os.path.lexists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        return f"{base!r} is a file, not a folder"
    probe = partial_name(os.path.join(base, "probe"))
    try:
        with open(probe, "x"):
            pass
        os.unlink(probe)
    except OSError as err:
        return f"cannot write into {base!r} ({err.strerror})"
    return ""


def file_sha256(path: str) -> str:
    """The SHA-256 of a file (hex), read in 1 MiB blocks (a Geant4 sample is hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The key of a record (train's card, validate's report) that gives {name: SHA-256} of the record itself and of the
# files written with it (its .md), so that the next run into the folder can tell them as that run's unchanged output
RECORD_FILES = "record_files"
_OWN_DIGEST_BLANK = "0" * 64  # a record's own SHA-256 is of its text with this in its place


def stage_record(staged: "StagedOutputs", out_dir: str, record: str, data: dict, texts: dict[str, str]) -> None:
    """`data` as the JSON file `record` in out_dir, with the text files `texts` ({name: text}, its .md) beside it,
    written to their temporary files in `staged`, so that they take their names with the run's other outputs
    (publish: the texts, then the record last). The JSON gets RECORD_FILES: the SHA-256 of each text and its own, the
    digest of its text with that value blank (record_sha256 checks it), which overwritten_outputs reads."""
    import io

    from eclreco import strict_json

    def sha(text):
        return hashlib.sha256(text.encode()).hexdigest()
    digests = {name: sha(text) for name, text in texts.items()}
    buf = io.StringIO()
    strict_json.dump({**data, RECORD_FILES: digests | {record: _OWN_DIGEST_BLANK}}, buf, indent=1)
    text = buf.getvalue()
    at = text.rindex(_OWN_DIGEST_BLANK)  # (the last key's last value)
    text = text[:at] + sha(text) + text[at + len(_OWN_DIGEST_BLANK):]
    for name, content in {**texts, record: text}.items():
        # UTF-8 as hashed, whatever the locale (an ASCII one could not write a report's σ68, and another would
        # write bytes that its digest does not match)
        with open(staged.path(os.path.join(out_dir, name)), "w", encoding="utf-8") as f:
            f.write(content)


def record_sha256(path: str, own: str) -> str:
    """The SHA-256 of the record at `path` with `own` (the own digest it records, stage_record) blank: `own` again when
    the file is as written."""
    with open(path, "rb") as f:
        text = f.read()
    at = text.rfind(own.encode())
    if at >= 0:
        text = text[:at] + _OWN_DIGEST_BLANK.encode() + text[at + len(own):]
    return hashlib.sha256(text).hexdigest()


def previous_outputs(out_dir: str, record: str, ours, rewritten) -> tuple[list[str], list[str]]:
    """(stale, changed): the files that the previous run's record in out_dir (`record`, a JSON file: the model card
    of train, the report of validate) lists and this run does not write again (`rewritten`), so that a folder holds
    one run's outputs, not an old plot or network beside a new report. Stale files are still as that run wrote them,
    changed ones are not (a user's file under that name now): only stale ones are removed, and every name not in
    `ours` (the names the command writes) stays. Read before the new record replaces the old one; a missing record,
    or one that vouches for none of its files (_record_listing), lists nothing."""
    listed, _ = _record_listing(out_dir, record)
    if listed is None:
        return [], []
    stale, changed = [], []
    for name, sha in sorted(listed.items()):
        path = os.path.join(out_dir, name)
        if name not in ours or name in rewritten or not os.path.isfile(path):
            continue
        (stale if file_sha256(path) == sha else changed).append(name)
    return stale, changed


def _record_listing(out_dir: str, record: str) -> tuple[dict | None, str]:
    """({name: SHA-256} of the files that the previous run's record in out_dir lists (`files`: the networks of a
    card, the plots of a report; and RECORD_FILES: its .md and itself), '') when it is a record of this command as that run wrote it; else (None, why it vouches
    for no file: '' when there is no record). A record it cannot check (an older eclreco's, or one changed since)
    vouches for none of the files it lists, not only for itself: they were refused one refusal later."""
    import json

    path = os.path.join(out_dir, record)
    if not os.path.isfile(path):
        return None, ""
    try:
        with open(path) as f:
            data = json.load(f)
        digests = data.get(RECORD_FILES)
    except (OSError, ValueError, AttributeError):  # not JSON, or no JSON object
        return None, "not a record that this command can read"
    if digests is None:
        return None, "it records no SHA-256 of itself: written by an older eclreco, so a change since cannot be ruled out"
    own = digests.get(record) if isinstance(digests, dict) else None
    if not isinstance(own, str) or record_sha256(path, own) != own:
        return None, "changed since the run that wrote it"
    # as written, but not by this command's run (write_card of a card of before `files`): say what it lacks
    if "files" not in data:
        return None, ("it has no `files` key (the SHA-256 of the files written with it), which this command's "
                      "records have")
    if not isinstance(data["files"], dict):
        return None, f"its `files` is a {type(data['files']).__name__}, not a map of file names to their SHA-256"
    return {str(k): v for k, v in {**data["files"], **digests}.items()}, ""


def overwritten_outputs(out_dir: str, record: str, rewritten) -> list[str]:
    """The files of out_dir that this run would write again (`rewritten`, names; the record itself always) and that
    are not the previous run's unchanged outputs, each as 'NAME (why)': the record itself when it is not one of this
    command's as written (_record_listing), and then every other such file too; else no record there, one that does
    not list it, or a file changed since (a user's file under that name). A run
    refuses them before any work: previous_outputs keeps such files when it would remove them, and writing a new
    file under their name destroys them as surely."""
    listed, refused = _record_listing(out_dir, record)
    out = []
    for name in sorted(set(rewritten) | {record}):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path) or (name == record and not refused):  # (a record as written: checked)
            continue
        if refused:
            out.append(f"{name} ({refused if name == record else f'{record}, refused too, cannot vouch for it'})")
        elif listed is None:
            out.append(f"{name} (no {record} there records it)")
        elif name not in listed:
            out.append(f"{name} ({record} does not list it)")
        elif file_sha256(path) != listed[name]:
            out.append(f"{name} (changed since the run of {record} wrote it)")
    return out


def overwrite_refusal(out_dir: str, record: str, rewritten, run: str) -> str:
    """Why a run (`run`: 'training', 'validation') must not write into out_dir, '' when it may: the files of
    overwritten_outputs, in one line that names -o, each file and why, and what to do. Said before any work (train
    and validate refuse with it)."""
    import shlex

    if not (would := overwritten_outputs(out_dir, record, rewritten)):
        return ""
    them = "it" if len(would) == 1 else "them"
    paths = " ".join(shlex.quote(os.path.join(out_dir, w.split(" ", 1)[0])) for w in would)
    return (f"-o {out_dir!r} holds {'; '.join(would)}: this {run} would overwrite {them}; remove {them} (rm {paths}) "
            "or choose another -o")


def overwrite_check(out_dir: str, record: str, rewritten, run: str) -> tuple[str, dict[str, str | None]]:
    """(overwrite_refusal, output_states of the files it checks): a run refuses with the first before any work, and
    gives the second to StagedOutputs.publish(unchanged=) at its end, which then replaces only what is still as it
    was at the check, not a second run's files or a user's that appeared there meanwhile. The states are taken
    before the check, so that a file changed between the two is refused at the end rather than replaced."""
    unchanged = output_states(os.path.join(out_dir, name) for name in sorted(set(rewritten) | {record}))
    return overwrite_refusal(out_dir, record, rewritten, run), unchanged


def remove_previous_outputs(out_dir: str, stale, changed, command: str, run: str, quiet: bool = False) -> None:
    """Removes previous_outputs' stale files (once the new outputs and their record are written) and says so
    (unless quiet); warns of the changed ones, which stay. command: 'eclreco train'; run:
    'training'."""
    for name in stale:
        with contextlib.suppress(FileNotFoundError):  # (removed meanwhile: gone as it should be)
            os.unlink(os.path.join(out_dir, name))
    for name in changed:
        print(f"{command}: warning: kept {name} in {out_dir}: the previous {run} wrote it, but it was changed "
              "since (remove it if it is not yours)", file=sys.stderr, flush=True)
    if stale and not quiet:
        print(f"removed the previous {run}'s {', '.join(stale)} from {out_dir}", flush=True)
