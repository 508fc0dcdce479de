"""Create Cloud TPU VM slices, ship this checkout to every worker, run training on all of them, fetch logs.

A thin wrapper over `gcloud compute tpus tpu-vm ...` (stdlib only, so it runs from any laptop that has
gcloud). Every subcommand takes `--dry-run`, which prints the exact commands (`+ ` and shell-quoted) and
runs nothing; without it each command is echoed the same way, run, and the first failure stops the tool
with exit status 1. Bad input is a one-line `error: ...` with exit status 2.

Example session (a 2-worker v5p-16 in us-east5-a):

    python launch/tpu.py info --type v5p-16        # 8 chips on 2 workers, runtime v2-alpha-tpuv5
    python launch/tpu.py create  --name rex --type v5p-16 --zone us-east5-a --spot
    python launch/tpu.py install --name rex --zone us-east5-a   # git archive HEAD -> every worker, .venv
    python launch/tpu.py run     --name rex --zone us-east5-a --config configs/qwen2p5_3b.py \\
        --workdir runs/run1 --detach -- --config.checkpoint.directory=gs://bucket/run1/checkpoints \\
        --config.steps=10 --config.model.path=/data/qwen2.5-3b
    python launch/tpu.py logs    --name rex --zone us-east5-a --worker 1 --follow
    python launch/tpu.py collect --name rex --zone us-east5-a --type v5p-16 --dest runs/run1 --workdir runs/run1
    python launch/tpu.py delete  --name rex --zone us-east5-a

`run` starts the same command on every worker (`--worker=all`) and nothing more: joining the workers
into one JAX job is the package's business. Each worker logs to `REPO_DIR/logs/RUN.HOSTNAME.log` (RUN
defaults to `ENTRY-<last part of the workdir>`; TPU VM host names end in `-w-<worker id>`), which is
where `logs` and `collect` look. The workdir of `train` and `demo` is a directory on each worker,
relative to REPO_DIR (e.g. `runs/run1`; an absolute path also works), never a gs:// URL: process 0's
copy holds metrics.jsonl, config.json and TensorBoard, and `collect --workdir` fetches the first two.
Checkpoints of a multi-host run go to a bucket every worker can write, through the override
`--config.checkpoint.directory=gs://...` (the default "" means WORKDIR/checkpoints: one-worker slices).
`--entry eval` gets the workdir as `--checkpoint`, so there a gs:// checkpoint path is fine.
Overrides go after `--`. `run` is foreground by default (gcloud interleaves every worker's output;
Ctrl-C may leave the remote processes running); `--detach` uses nohup and returns at once.

Topology (what `slice_info` assumes; "hosts" means TPU VMs, i.e. gcloud's workers):
  v4-N, v5p-N   N counts TensorCores, 2 per chip: chips = N/2, 4 chips per VM, VMs = N/8 (v4-8: 1 VM).
                N must be a multiple of 8 (v4 up to 4096, v5p up to 12288); gcloud decides which it offers.
  v5e-N (gcloud v5litepod-N), v6e-N
                N counts chips (1 TensorCore each), N in 1, 4, 8, 16, 32, 64, 128, 256. N <= 8 is one VM
                (v5e-8 / v6e-8: all 8 chips on one VM); larger slices use 4-chip VMs, VMs = N/4.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Google's TPU VM software (runtime) versions per generation; --version overrides.
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GCLOUD_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
ALIASES = {"v5litepod": "v5e"}
POD_2D_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e chips per slice
MAX_CORES = {"v4": 4096, "v5p": 12288}
# entry -> (module, the flag that takes --workdir): rexrag-eval reads a training workdir as --checkpoint.
ENTRIES = {
    "train": ("rexrag_jax.cli.train", "--workdir"),
    "eval": ("rexrag_jax.cli.eval", "--checkpoint"),
    "demo": ("rexrag_jax.cli.demo", "--workdir"),
    "pilot": ("rexrag_jax.cli.pilot", "--workdir"),
}
VALID_TYPES = (
    "v4-N or v5p-N (N = TensorCores, a multiple of 8: v4-8 .. v4-4096, v5p-8 .. v5p-12288); "
    "v5e-N, v5litepod-N or v6e-N (N = chips: " + ", ".join(map(str, POD_2D_SIZES)) + ")"
)
REMOTE_TARBALL = "rexrag_jax-src.tar.gz"
_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"[a-z][-a-z0-9.:]*[a-z0-9]")
_RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIR = re.compile(r"[A-Za-z0-9._/-]+")
_WORKDIR = re.compile(r"[A-Za-z0-9._/=,+-]+")  # sweep run names use '=,+' too


class UsageError(ValueError):
    """Bad input: reported as one `error: ...` line, exit status 2."""


def slice_info(accelerator_type: str) -> dict:
    """generation, gcloud_type, tensorcores, chips, hosts (TPU VMs), chips_per_host, runtime of a type."""
    text = accelerator_type.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-([0-9]+)", text)
    if not m:
        raise UsageError(f"unknown TPU type {accelerator_type!r}; valid: {VALID_TYPES}")
    gen, n = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen in MAX_CORES:
        if n % 8 or not 8 <= n <= MAX_CORES[gen]:
            raise UsageError(
                f"bad {gen} size in {accelerator_type!r}: N counts TensorCores and must be a "
                f"multiple of 8 in 8..{MAX_CORES[gen]}; valid: {VALID_TYPES}"
            )
        cores, chips = n, n // 2
        per_host = 4
    else:
        if n not in POD_2D_SIZES:
            raise UsageError(
                f"bad {gen} size in {accelerator_type!r}: N counts chips and must be one of "
                f"{', '.join(map(str, POD_2D_SIZES))}; valid: {VALID_TYPES}"
            )
        cores, chips = n, n
        per_host = chips if chips <= 8 else 4
    return {
        "generation": gen,
        "gcloud_type": f"{GCLOUD_PREFIX[gen]}-{n}",
        "tensorcores": cores,
        "chips": chips,
        "hosts": chips // per_host,
        "chips_per_host": per_host,
        "runtime": RUNTIMES[gen],
    }


def _checked(pattern: re.Pattern, what: str, rule: str):
    """An argparse type that rejects values GCP (or the remote shell) would, naming the value."""

    def check(text: str) -> str:
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: {rule}")
        return text

    return check


def _tpu_type(text: str) -> str:
    try:
        slice_info(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower()


def _repo_dir(text: str) -> str:
    text = text[2:] if text.startswith("~/") else text  # ssh and scp start in $HOME anyway
    if not _DIR.fullmatch(text) or text.strip("/.") == "" or ".." in text.split("/"):
        raise argparse.ArgumentTypeError(
            f"bad repo dir {text!r}: a path below $HOME or an absolute path of letters, digits, '._/-'"
        )
    return text


def _workdir(text: str) -> str:
    """collect --workdir: the run's workdir as `run` got it (relative to the repo dir, or absolute)."""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"bad workdir {text!r}: the workdir is a directory on each worker (like runs/run1), not a URL"
        )
    if not _WORKDIR.fullmatch(text) or text.strip("/.") == "" or ".." in text.split("/"):
        raise argparse.ArgumentTypeError(
            f"bad workdir {text!r}: a path relative to the repo dir (or absolute) of letters, digits, '._/=,+-'"
        )
    return text.rstrip("/")


def _positive(text: str, low: int = 1) -> int:
    if not text.isdigit() or int(text) < low:
        raise argparse.ArgumentTypeError(f"not an integer >= {low}: {text!r}")
    return int(text)


def gcloud(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB NAME ... --zone=Z [--project=P]`."""
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}", *project]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    info = slice_info(args.type)
    extra = ["--spot"] * args.spot + ["--preemptible"] * args.preemptible + ["--reserved"] * args.reserved
    return [
        gcloud(
            "create",
            args,
            args.name,
            f"--accelerator-type={info['gcloud_type']}",
            f"--version={args.version or info['runtime']}",
            *extra,
        )
    ]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    return [gcloud("delete", args, args.name, "--quiet")]


def describe_commands(args: argparse.Namespace) -> list[list[str]]:
    return [gcloud("describe", args, args.name)]


def dirty_check_command(root: Path = REPO_ROOT) -> list[str]:
    """Prints the tracked files with uncommitted changes (nothing when clean)."""
    return ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]


def local_tarball(name: str) -> str:
    return str(Path(tempfile.gettempdir()) / f"rexrag_jax-{name}.tar.gz")


def install_commands(args: argparse.Namespace, root: Path = REPO_ROOT) -> list[list[str]]:
    """Archive HEAD (or, with --allow-dirty, HEAD plus the uncommitted changes to tracked files, via a
    `git stash create` commit that touches neither the tree nor the stash list), copy it to every worker,
    unpack it into the repo dir there and run launch/install_worker.sh on every worker at once."""
    tarball = local_tarball(args.name)
    if args.allow_dirty:
        archive = [
            "sh",
            "-c",
            'cd "$1" && c=$(git stash create) && git archive --format=tar.gz -o "$2" "${c:-HEAD}"',
            "sh",
            str(root),
            tarball,
        ]
    else:
        archive = ["git", "-C", str(root), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    d, t = shlex.quote(args.repo_dir), shlex.quote(REMOTE_TARBALL)
    remote = f"mkdir -p {d} && tar xzf {t} -C {d} && rm -f {t} && bash {d}/launch/install_worker.sh"
    return [
        archive,
        gcloud("scp", args, tarball, f"{args.name}:{REMOTE_TARBALL}", "--worker=all"),
        gcloud("ssh", args, args.name, "--worker=all", f"--command={remote}"),
    ]


def config_in_checkout(config: str, root: Path = REPO_ROOT) -> str:
    """The config as a path relative to the checkout (the workers run from its copy); UsageError if the
    file is not in it. A `path:arg` suffix (ml_collections config arguments) is kept."""
    path, colon, arg = config.partition(":")
    for candidate in (Path(path), root / path):
        if candidate.is_file():
            try:
                rel = candidate.resolve().relative_to(root.resolve())
            except ValueError:
                raise UsageError(
                    f"config {config!r} is outside the checkout {root}; install only ships "
                    "the checkout, so put it there"
                ) from None
            return rel.as_posix() + colon + arg
    raise UsageError(f"config file not found: {path!r} (looked in . and {root})")


def run_name(args: argparse.Namespace) -> str:
    if args.run:
        return args.run
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", args.workdir.rstrip("/").rsplit("/", 1)[-1]).strip("._-")
    return f"{args.entry}-{base}" if base else args.entry


def remote_run_command(args: argparse.Namespace, config: str) -> str:
    """The shell line every worker runs: the package's module, stdout+stderr into logs/RUN.HOST.log."""
    module, workdir_flag = ENTRIES[args.entry]
    python = [
        "PYTHONUNBUFFERED=1",
        ".venv/bin/python",
        "-m",
        module,
        "--config",
        config,
        workdir_flag,
        args.workdir,
        *args.overrides,
    ]
    log = f"logs/{shlex.quote(run_name(args))}.$(hostname).log"
    head = f"cd {shlex.quote(args.repo_dir)} && mkdir -p logs && "
    if args.detach:  # every stream redirected, so the ssh session can return at once
        return (
            head + f"{python[0]} nohup {shlex.join(python[1:])} > {log} 2>&1 < /dev/null & "
            f'echo "$(hostname): started, log {args.repo_dir}/{log}"'
        )
    return head + f"set -o pipefail && {shlex.join(python)} 2>&1 | tee {log}"


def run_commands(args: argparse.Namespace, root: Path = REPO_ROOT) -> list[list[str]]:
    if not args.workdir.strip():
        raise UsageError("--workdir is empty")
    if args.entry != "eval" and "://" in args.workdir:
        raise UsageError(
            f"--workdir {args.workdir} is a directory on each worker; put checkpoints in a bucket "
            "with -- --config.checkpoint.directory=gs://..."
        )
    config = config_in_checkout(args.config, root)
    return [gcloud("ssh", args, args.name, "--worker=all", f"--command={remote_run_command(args, config)}")]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    """Tail one worker's log: the run's, or the newest in logs/ without --run."""
    log = f"logs/{shlex.quote(args.run)}.$(hostname).log" if args.run else '"$(ls -t logs/*.log | head -n 1)"'
    tail = f"tail -n {args.lines}" + (" -F" if args.follow else "")
    remote = f"cd {shlex.quote(args.repo_dir)} && {tail} {log}"
    return [gcloud("ssh", args, args.name, f"--worker={args.worker}", f"--command={remote}")]


def collect_commands(args: argparse.Namespace, hosts: int) -> list[list[str]]:
    """Each worker's logs (the run's, or all) into DEST/workerI/; with --workdir also worker 0's
    WORKDIR/metrics.jsonl and WORKDIR/config.json (process 0 writes them) into DEST/worker0/."""
    pattern = f"{args.run}.*.log" if args.run else "*.log"
    commands = []
    for i in range(hosts):
        dest = str(Path(args.dest) / f"worker{i}")
        commands += [
            ["mkdir", "-p", dest],
            gcloud("scp", args, f"{args.name}:{args.repo_dir}/logs/{pattern}", dest + "/", f"--worker={i}"),
        ]
        if i == 0 and args.workdir:
            workdir = args.workdir if args.workdir.startswith("/") else f"{args.repo_dir}/{args.workdir}"
            files = [f"{args.name}:{workdir}/{name}" for name in ("metrics.jsonl", "config.json")]
            commands.append(gcloud("scp", args, *files, dest + "/", "--worker=0"))
    return commands


def collect_hosts(args: argparse.Namespace) -> int:
    """Workers to collect from: --hosts, else --type, else (not in dry-run) the slice's own description."""
    if args.hosts:
        return args.hosts
    if args.type:
        return slice_info(args.type)["hosts"]
    if args.dry_run:
        raise UsageError("collect --dry-run needs --type or --hosts (it cannot ask gcloud how many workers)")
    cmd = gcloud("describe", args, args.name, "--format=json")
    _echo(cmd)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise CommandFailed(cmd, done.returncode, done.stderr)
    return len(json.loads(done.stdout).get("networkEndpoints") or [None])


def info_commands(args: argparse.Namespace) -> list[list[str]]:
    print(json.dumps(slice_info(args.type), indent=2))
    return []


class CommandFailed(RuntimeError):
    def __init__(self, cmd: list[str], status: int, detail: str = ""):
        super().__init__(
            f"command failed with exit status {status}: {shlex.join(cmd)}"
            + (f" ({detail.strip().splitlines()[-1]})" if detail.strip() else "")
        )


def _echo(cmd: list[str]) -> None:
    print("+ " + shlex.join(cmd), flush=True)


def execute(commands: list[list[str]]) -> None:
    """Run each command in turn (echoed first); raise CommandFailed at the first non-zero exit."""
    for cmd in commands:
        _echo(cmd)
        try:
            status = subprocess.run(cmd).returncode
        except FileNotFoundError:
            raise CommandFailed(cmd, 127, f"{cmd[0]} not found on PATH") from None
        if status:
            raise CommandFailed(cmd, status)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit status 2 (main's job)
        raise UsageError(f"{self.prog.split(' ', 1)[-1]}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    name = _checked(
        _NAME,
        "TPU name",
        "lowercase letters, digits and hyphens, starting with a letter, "
        "not ending with a hyphen, at most 63 characters",
    )
    common = _Parser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    slice_ = _Parser(add_help=False, parents=[common])
    slice_.add_argument("--name", required=True, type=name, help="TPU VM name")
    slice_.add_argument("--zone", required=True, type=_checked(_ZONE, "zone", "like us-central2-b"))
    slice_.add_argument(
        "--project", type=_checked(_PROJECT, "project", "a GCP project id"), help="default: gcloud's core/project"
    )
    repo = _Parser(add_help=False)
    repo.add_argument(
        "--repo-dir",
        default="rexrag_jax",
        type=_repo_dir,
        help="checkout on each worker, relative to $HOME (default rexrag_jax)",
    )
    tpu_type = {"type": _tpu_type, "help": "v4-8, v5e-16 (= v5litepod-16), v5p-16, v6e-8, ..."}

    p = sub.add_parser("create", parents=[slice_], help="create a TPU VM slice")
    p.add_argument("--type", required=True, **tpu_type)
    p.add_argument("--version", help="TPU software version (default: per generation, see RUNTIMES)")
    how = p.add_mutually_exclusive_group()
    for flag in ("--spot", "--preemptible", "--reserved"):
        how.add_argument(flag, action="store_true")
    p.set_defaults(build=create_commands)
    sub.add_parser("delete", parents=[slice_], help="delete it").set_defaults(build=delete_commands)
    sub.add_parser(
        "describe", aliases=["status"], parents=[slice_], help="gcloud's description (state, health, workers)"
    ).set_defaults(build=describe_commands)
    p = sub.add_parser("info", parents=[common], help="chips, workers and runtime of a type (no gcloud)")
    p.add_argument("--type", required=True, **tpu_type)
    p.set_defaults(build=info_commands)

    p = sub.add_parser("install", parents=[slice_, repo], help="ship HEAD to every worker and install it")
    p.add_argument("--allow-dirty", action="store_true", help="ship uncommitted changes to tracked files too")
    p.set_defaults(build=install_commands)

    p = sub.add_parser("run", parents=[slice_, repo], help="run an entry point on every worker; overrides after --")
    p.add_argument("--config", required=True, help="config file in this checkout, e.g. configs/qwen2p5_3b.py")
    p.add_argument(
        "--workdir",
        required=True,
        help="train/demo: a directory on each worker, relative to the repo dir (e.g. runs/run1; "
        "checkpoints to a bucket with -- --config.checkpoint.directory=gs://...); "
        "eval gets it as --checkpoint (gs:// allowed)",
    )
    p.add_argument("--entry", choices=sorted(ENTRIES), default="train")
    p.add_argument(
        "--run",
        type=_checked(_RUN, "run name", "letters, digits, '._-'"),
        help="log name (default ENTRY-<workdir basename>)",
    )
    p.add_argument("--detach", action="store_true", help="nohup in the background; follow with `logs`")
    p.set_defaults(build=run_commands)

    p = sub.add_parser("logs", parents=[slice_, repo], help="tail one worker's log")
    p.add_argument("--worker", type=lambda t: _positive(t, 0), default=0, help="worker id (default 0)")
    p.add_argument("--run", type=_checked(_RUN, "run name", "letters, digits, '._-'"), help="default: the newest log")
    p.add_argument("--lines", type=_positive, default=100)
    p.add_argument("--follow", action="store_true")
    p.set_defaults(build=logs_commands)

    p = sub.add_parser("collect", parents=[slice_, repo], help="copy every worker's logs to DEST/workerI/")
    p.add_argument("--dest", required=True)
    p.add_argument(
        "--workdir",
        type=_workdir,
        help="the run's workdir (as given to run): also copy worker 0's metrics.jsonl and "
        "config.json from it into DEST/worker0/",
    )
    p.add_argument("--run", type=_checked(_RUN, "run name", "letters, digits, '._-'"), help="default: all logs")
    p.add_argument("--type", **tpu_type)
    p.add_argument("--hosts", type=_positive, help="number of workers (default: from --type or gcloud)")
    p.set_defaults(build=lambda args: collect_commands(args, collect_hosts(args)))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(argv)
        args.overrides = overrides
        if overrides and args.command != "run":
            raise UsageError(f"only run takes overrides after --, got {shlex.join(overrides)!r}")
        if args.command == "create":
            info = slice_info(args.type)
            print(
                f"# {info['gcloud_type']}: {info['chips']} chips on {info['hosts']} worker(s), "
                f"{info['chips_per_host']} each; runtime {args.version or info['runtime']}",
                flush=True,
            )
        check = args.command == "install" and not args.allow_dirty
        commands = args.build(args)
        if args.dry_run:
            for cmd in ([dirty_check_command()] if check else []) + commands:
                _echo(cmd)
            return 0
        if check:
            _echo(dirty_check_command())
            done = subprocess.run(dirty_check_command(), capture_output=True, text=True)
            if done.returncode:
                raise CommandFailed(dirty_check_command(), done.returncode, done.stderr)
            if done.stdout.strip():
                files = ", ".join(line[3:] for line in done.stdout.splitlines()[:5])
                raise UsageError(
                    f"uncommitted changes to tracked files ({files}); install ships HEAD: "
                    "commit them, or pass --allow-dirty to ship them too"
                )
        execute(commands)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (remote processes may still be running; see `logs`)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
