"""Optional ZeroMQ CURVE authentication and encryption for the streaming sockets.

A key directory made by ``eclreco hlt keys -o DIR`` holds one key pair per party, in the
``zmq.auth`` certificate format::

    DIR/public/NAME.key           public key of NAME (every party may read these)
    DIR/private/NAME.key_secret   key pair of NAME (mode 0600; give it only to NAME's machines)

A process is started with ``--curve-dir DIR`` (and ``--curve-name NAME``, default its role) and
then uses ``private/NAME.key_secret`` as its own key. Every socket it **binds** is a CURVE
server that accepts only clients whose public key is in ``DIR/public`` (checked by a
``zmq.auth.thread.ThreadAuthenticator``); every socket it **connects** is a CURVE client that
knows the server's public key (``public/SERVER.key``; SERVER is the peer's role name, e.g.
``distributor``). A peer with an unknown key, or one that speaks plain ZeroMQ, fails the
handshake: none of its messages is ever delivered. Without ``--curve-dir`` nothing changes.
"""
from __future__ import annotations

import os
import shutil
import threading

import zmq
import zmq.auth

from eclreco.cli_types import option_dest, option_given
from eclreco.hlt.protocol import CURVE_ROLES

DEFAULT_NAMES = ("distributor", "collector", "worker", "control", "daq", "reco")

_auth_lock = threading.Lock()
_authenticators: dict[int, object] = {}


def generate_keys(directory: str, names=DEFAULT_NAMES, overwrite: bool = False) -> dict[str, tuple[str, str]]:
    """Create one key pair per name; returns {name: (public_file, secret_file)}."""
    pub = os.path.join(directory, "public")
    priv = os.path.join(directory, "private")
    files = {}
    for name in names:  # every name checked before anything is made (a refusal left public/ and private/)
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"bad key name {name!r} (a file name: no {os.sep!r}, not beginning with '.')")
        pf, sf = os.path.join(pub, f"{name}.key"), os.path.join(priv, f"{name}.key_secret")
        if not overwrite and (os.path.exists(pf) or os.path.exists(sf)):
            raise FileExistsError(f"{pf} or {sf} exists (use --force to replace)")
        files[name] = (pf, sf)
    os.makedirs(pub, exist_ok=True)
    os.makedirs(priv, exist_ok=True)
    os.chmod(priv, 0o700)
    out = {}
    for name, (pf, sf) in files.items():
        tmp_pub, tmp_sec = zmq.auth.create_certificates(priv, name)  # both files in private/
        os.chmod(tmp_sec, 0o600)
        shutil.move(tmp_pub, pf)
        out[name] = (pf, sf)
    return out


class Curve:
    """The CURVE identity of one process (see the module docstring)."""

    def __init__(self, directory: str, name: str, secret_file: str = ""):
        self.directory = directory
        self.name = name
        self.public_dir = os.path.join(directory, "public")
        secret_file = secret_file or os.path.join(directory, "private", f"{name}.key_secret")
        if not os.path.exists(secret_file):
            raise FileNotFoundError(f"CURVE secret key {secret_file} not found (eclreco hlt keys -o {directory})")
        self.public, self.secret = zmq.auth.load_certificate(secret_file)
        if self.secret is None:
            raise ValueError(f"{secret_file} holds no secret key")

    @classmethod
    def from_args(cls, args, default_name: str) -> "Curve | None":
        d = getattr(args, "curve_dir", None)
        if not d:
            return None
        return cls(d, getattr(args, "curve_name", None) or default_name, getattr(args, "curve_secret", "") or "")

    def server_key(self, server: str) -> bytes:
        f = os.path.join(self.public_dir, f"{server}.key")
        if not os.path.exists(f):
            raise FileNotFoundError(f"CURVE public key of '{server}' not found: {f}")
        return zmq.auth.load_certificate(f)[0]

    def server(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` (before bind) a CURVE server accepting the keys in public/."""
        start_authenticator(sock.context, self.public_dir)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        return sock

    def client(self, sock: zmq.Socket, server: str) -> zmq.Socket:
        """Make `sock` (before connect) a CURVE client of the party named `server`."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_key(server)
        return sock

    def apply(self, sock: zmq.Socket, bind: bool, server: str) -> zmq.Socket:
        return self.server(sock) if bind else self.client(sock, server)


def curve_option_error(args, default_name: str, servers=(), server_option: str = "--curve-dir") -> str:
    """Why the CURVE options of `args` (add_curve_arguments') cannot be used, '' when they can or there is no
    --curve-dir: one line naming the option, said before any socket or module starts. A key directory with
    public/, the own key pair (--curve-secret, else private/NAME.key_secret), and the public key of each
    of `servers`, the parties it connects to (`server_option` names the option that chose them). Without
    it a missing key failed at ZMQInput's initialize (reco.py: exit 1, source locations) or as a
    FileNotFoundError naming no option.

    An option that would do nothing is refused too (it was ignored: a plaintext link, or a peer's key never
    asked for, that its operator believed set): without --curve-dir a --curve-name, --curve-secret or
    --curve-server given (their defaults are therefore None and ''); and with `server_option` '--curve-server'
    (daq-emulator, reco.py: the option naming the one peer a connecting socket knows, None when not given),
    a --curve-server given to a socket that binds (`servers` empty): it is the CURVE server itself."""
    directory = getattr(args, "curve_dir", "") or ""
    server = getattr(args, "curve_server", None) if server_option == "--curve-server" else None
    if server is not None and not servers:
        return (f"--curve-server {server!r} names the peer's CURVE key when connecting: this socket binds, and is the "
                "CURVE server itself (it accepts the peers whose keys are in --curve-dir's public/)")
    if not directory:
        given = _key_options_given(args) + (["--curve-server"] if server is not None else [])
        if given:
            return (f"{', '.join(given)}: {'it names a' if len(given) == 1 else 'they name'} CURVE key, which does "
                    "nothing without --curve-dir (the link would be plain, unencrypted ZeroMQ)")
        return ""
    if not os.path.isdir(directory):
        return (f"--curve-dir {directory!r}: {'not a directory' if os.path.exists(directory) else 'no such directory'}"
                f" (a key directory is made by eclreco hlt keys -o DIR)")
    if not os.path.isdir(os.path.join(directory, "public")):
        return f"--curve-dir {directory!r}: no public/ in it (not a key directory of eclreco hlt keys)"
    # given but empty (a variable left unset): the default key was taken in silence, not the one the operator meant
    empty = [option for option in _key_options_given(args) if not getattr(args, option_dest(option))]
    if empty:
        return (f"{empty[0]} '': names no key (leave it out for the default: private/{default_name}.key_secret in "
                "--curve-dir)")
    secret = getattr(args, "curve_secret", "") or ""
    try:
        curve = Curve(directory, getattr(args, "curve_name", "") or default_name, secret)
    except (OSError, ValueError) as err:  # missing, a directory, not a key file
        return f"{'--curve-secret' if secret else '--curve-dir'} {secret or directory!r}: {err}"
    for server in servers:
        try:
            curve.server_key(server)
        except (OSError, ValueError) as err:
            return f"{server_option} {server if server_option != '--curve-dir' else directory!r}: {err}"
    return ""


def start_authenticator(ctx: zmq.Context, public_dir: str):
    """One ZAP handler per context, accepting the public keys found in `public_dir`."""
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            _authenticators[id(ctx)] = auth
        auth.configure_curve(domain="*", location=public_dir)
        return auth


def stop_authenticators():
    with _auth_lock:
        for auth in _authenticators.values():
            auth.stop()
        _authenticators.clear()


# the keys of hlt run's roles, as its messages name them
_ROLE_KEYS = f"DIR/private/ROLE.key_secret ({', '.join(CURVE_ROLES)})"


def add_curve_arguments(p, default_name: str, roles_own_keys: bool = False):
    """The CURVE options of a command whose key is `default_name`; roles_own_keys (hlt run): the processes it
    starts take their own keys, by their roles, from --curve-dir, and its --curve-name and --curve-secret, which
    would choose one key for the supervisor alone, are refused (roles_key_options_error)."""
    g = p.add_argument_group("CURVE (optional authentication and encryption; docs/reliability.md)")
    g.add_argument("--curve-dir", default="", help="key directory of `eclreco hlt keys` (default: no CURVE)")
    own = f"refused: each role uses its own key, {_ROLE_KEYS}" if roles_own_keys else ""
    # no default here (Curve.from_args applies it): given without --curve-dir, it is refused (curve_option_error)
    g.add_argument("--curve-name", help=own or f"own key name in DIR/private (default {default_name})")
    g.add_argument("--curve-secret", default="", help=own or "own key pair file (default DIR/private/NAME.key_secret)")
    return g


def _key_options_given(args) -> list[str]:
    """Which of --curve-name and --curve-secret the command line gave, whatever their value: tested for truth,
    an empty one (`--curve-name ''`, a variable left unset) was taken for none and passed silently."""
    return [option for option, default in (("--curve-name", None), ("--curve-secret", ""))
            if option_given(args, option, default)]


def roles_key_options_error(args) -> str:
    """Why hlt run refuses its --curve-name or --curve-secret (with --curve-dir; without it curve_option_error
    refuses them), '' when neither is given: the roles it starts use their own keys of --curve-dir, so they
    applied to the supervisor's control link alone, and the operator believed the farm used that key."""
    given = _key_options_given(args)
    if not given or not getattr(args, "curve_dir", ""):
        return ""
    return (f"{', '.join(given)}: hlt run's roles use their own keys of --curve-dir, {_ROLE_KEYS}, not one chosen "
            "for all; start the roles one by one (hlt distributor|collector|worker --curve-name ...) for other keys")


def declare_curve_params(module, own_name: str, server_name: str) -> None:
    """The CURVE parameters of a ZeroMQ module (ZMQInput, ZMQOutput): the module twin of
    add_curve_arguments."""
    module.add_param("curve_dir", "", "CURVE key directory (eclreco hlt keys; empty: no CURVE)")
    module.add_param("curve_name", own_name, "own key name in curve_dir/private")
    module.add_param("curve_secret", "", "own key pair file (default curve_dir/private/NAME.key_secret)")
    module.add_param("curve_server", server_name, "key name of the peer when connecting (bind=False)")


def apply_curve_params(module, socket) -> None:
    """Configures `socket` from a module's CURVE parameters (nothing when curve_dir is empty)."""
    if module.param("curve_dir"):
        Curve(module.param("curve_dir"), module.param("curve_name"), module.param("curve_secret")).apply(
            socket, bool(module.param("bind")), module.param("curve_server"))


def keys_main(args) -> int:
    """`eclreco hlt keys`: -o is an output folder as any command's (paths.output_folder: a misspelt folder
    above it is an error, not a new tree, said in one line, as is a bad name of --names)."""
    from eclreco.paths import output_folder

    names = [n.strip() for n in args.names.split(",")]
    if not any(names):
        raise ValueError(f"--names {args.names!r} names no party")
    # an empty name (a,,b: a typo, perhaps a party left out) was dropped and a repeated one made twice, exit 0
    if "" in names or len(set(names)) != len(names):
        raise ValueError(f"--names {args.names!r}: {'an empty name' if '' in names else 'a name given twice'} "
                         "(comma-separated parties, one key pair each)")
    with output_folder(args.output):
        try:
            made = generate_keys(args.output, names, overwrite=args.force)
        except ValueError as err:
            raise ValueError(f"--names: {err}") from None
    for name, (pf, sf) in made.items():
        print(f"{name}: public {pf}  secret {sf}")
    return 0
