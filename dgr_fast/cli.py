"""The command line: ``dgr-fast train`` (train and compare MTL methods on a data set) and ``dgr-fast bench``.

    dgr-fast train                              # the default comparison on multi-digits, CPU, a few minutes
    dgr-fast train --compare ew,pcgrad,pcgrad+dgr --epochs 5 --probe
    dgr-fast train --dataset nyuv2 --data-dir ~/data/nyuv2 --method cagrad --dgr 0.1 --optimizer sgd --lr 0.1
    dgr-fast bench dgr --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # imported where used: main's Ctrl-C handler must be in place before the slow import
    import torch

DEFAULT_COMPARE = "ew,ew+dgr,adatask,adatask+dgr"
# Per data set: what a run uses unless told otherwise. lambda and the optimizer settings of nyuv2/utkface are the DGR
# paper's; the epochs are cut to what a CPU finishes (the paper trains 300 / 100 epochs).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "multi-digits": {"epochs": 8, "batch_size": 64, "lr": 1e-3, "dgr": 0.1},
    "synthetic": {"epochs": 10, "batch_size": 128, "lr": 1e-3, "dgr": 0.1},
    "nyuv2": {"epochs": 10, "batch_size": 4, "lr": 1e-4, "dgr": 0.1},
    "utkface": {"epochs": 10, "batch_size": 64, "lr": 1e-5, "dgr": 1e-6},
}
# --paper-setting: the DGR authors' optimizer where their trainer fixes one (NYUv2: SGD 0.1, momentum 0.9, weight
# decay 1e-4, cosine schedule); elsewhere the data set's defaults (UTKFace: their Adam at 1e-5 already).
PAPER_OPTIMIZER: dict[str, dict[str, Any]] = {
    "nyuv2": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine"},
}


def paper_optimizer(args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer settings ``--paper-setting`` fixes for the data set (empty without the flag)."""
    return PAPER_OPTIMIZER.get(args.dataset, {}) if args.paper_setting else {}


class CLIError(Exception):
    """Bad arguments or data: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is the one line ``dgr-fast train: error: ...`` like every other error of the
    command (argparse's default prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _finite(kind):
    """``kind(text)``, refusing inf and nan: float() reads both (and 1e999 as inf), and a run with either trains
    nonsense and used to write them into the JSON."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value
    return parse


def _positive(kind):
    def parse(text: str):
        value = _finite(kind)(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    value = _finite(float)(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {text}")
        return value
    return parse


# Options some data sets take: --flag -> load_dataset keyword (build_parser gives their types and help).
DATASET_OPTIONS = ("correlation", "num_tasks", "downsample", "image_size")


def build_parser() -> argparse.ArgumentParser:
    from dgr_fast.backends import BACKENDS
    from dgr_fast.benchmarks import BENCHMARKS
    from dgr_fast.data import DATASETS
    from dgr_fast.data.utkface import MAX_IMAGE_SIZE
    from dgr_fast.mtl import METHODS
    from dgr_fast.train.trainer import OPTIMIZERS

    parser = _Parser(prog="dgr-fast", description="Fused multi-task learning: train and benchmark.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = commands.add_parser("train", help="train a multi-task model with one or several methods",
                            description="Train a hard-parameter-sharing model; with no method options, compare "
                                        f"{DEFAULT_COMPARE} on multi-digits.")
    t.add_argument("--dataset", default="multi-digits", choices=DATASETS)
    t.add_argument("--data-dir", help="the data folder (nyuv2, utkface)")
    t.add_argument("--train-size", type=_positive(int), help="samples to generate / use of the training split")
    t.add_argument("--test-size", type=_positive(int), help="samples to generate / use of the test split")
    # The data set options (DATASET_OPTIONS); the loaders check them again, for calls from Python.
    t.add_argument("--correlation", type=float, help="synthetic: cosine of the tasks' weight vectors, in [0, 1] "
                                                     "(default 0.5)")
    t.add_argument("--num-tasks", type=int, help="synthetic: how many regression tasks, >= 2 (default 2)")
    t.add_argument("--downsample", type=int, help="nyuv2: shrink images and targets by this integer factor "
                                                  "(default 1)")
    t.add_argument("--image-size", type=_int_in(1, MAX_IMAGE_SIZE), metavar="S",
                   help=f"utkface: the side of the S x S images fed to the model, 1..{MAX_IMAGE_SIZE} (default 64; "
                        "the release's crops are 200 x 200)")
    t.add_argument("--method", choices=tuple(METHODS), help="loss weighting or gradient aggregator (default ew)")
    t.add_argument("--dgr", type=_non_negative_float, metavar="LAMBDA", help="DGR penalty weight (0: none)")
    t.add_argument("--dgr-backend", choices=BACKENDS, help="backend of the DGR penalty (default: automatic)")
    t.add_argument("--dgr-resample", choices=("never", "step", "epoch"), default="never", help="when dummy heads are redrawn")
    t.add_argument("--dummy-heads", choices=("same", "linear"), default="same",
                   help="same (default, the paper's): DGR's dummy heads copy the model's head architecture, which "
                        "for the default linear heads is the fused linear kind; linear: linear dummy heads always")
    t.add_argument("--paper-setting", action="store_true",
                   help="the DGR authors' head architectures (DeepLab heads on nyuv2, Linear-ReLU-Linear-ReLU on "
                        "row tasks) and, on nyuv2, their optimizer: SGD lr 0.1, momentum 0.9, weight decay 1e-4, "
                        "cosine schedule (--optimizer / --lr override)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    t.add_argument("--sam", type=_non_negative_float, metavar="RHO", help="task-based SAM with this radius (0: none)")
    t.add_argument("--meta", action="store_true", help="single-gradient-step meta MTL")
    t.add_argument("--meta-alpha", type=_positive(float), help="meta inner step size (default: --lr)")
    t.add_argument("--grad-mode", choices=("loop", "batched"), default="loop", help="how per-task gradients are taken")
    t.add_argument("--compare", metavar="SPECS",
                   help="comma-separated method specs, e.g. ew,ew+dgr,adatask,adatask+dgr,pcgrad+dgr=0.01,cagrad+sam")
    t.add_argument("--epochs", type=_positive(int))
    t.add_argument("--batch-size", type=_positive(int))
    t.add_argument("--lr", type=_positive(float))
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--probe", action="store_true", help="evaluate frozen features with a linear probe and k-NN")
    t.add_argument("--out", default="runs", help="folder for the JSON result and the plot (default runs/)")
    t.add_argument("--json", metavar="PATH", help="the JSON result (default OUT/DATASET.json)")
    t.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    t.add_argument("--dominance", action="store_true",
                   help="track each task's share of the shared layers' updates (the AdaTask paper's rAU): a table, "
                        "the JSON's runs[].dominance and OUT/DATASET_dominance.png")

    b = commands.add_parser("bench", help="run the benchmarks (needs the source checkout's benchmarks/ folder)")
    b.add_argument("which", nargs="?", default="all", choices=(*BENCHMARKS, "all"))
    b.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    b.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    b.add_argument("--out", help="folder for the CSV files and plots (default benchmarks/out)")
    return parser


def _specs(args: argparse.Namespace, defaults: dict[str, Any]) -> list:
    from dgr_fast.train.trainer import RunConfig, SpecError, check_config, parse_spec

    single = any(v not in (None, False) for v in (args.method, args.dgr, args.optimizer, args.sam, args.meta))
    if args.compare and args.meta:
        raise CLIError("--meta and --compare: write meta into a spec instead (e.g. --compare ew,meta)")
    paper = paper_optimizer(args)
    optimizer = args.optimizer or paper.get("optimizer", "adam")
    dgr = args.dgr if args.dgr else defaults["dgr"]
    sam = args.sam if args.sam else 2.0  # TaskSAM's default radius (the authors' adaptive-form value)
    if args.compare or not single:
        texts = [s for s in (args.compare or DEFAULT_COMPARE).split(",") if s.strip()]
        if not texts:
            raise CLIError("--compare: no method specs given")
        return [parse_spec(s, optimizer=optimizer, dgr_lambda=dgr, sam_rho=sam) for s in texts]
    config = RunConfig(spec="", method=args.method or "ew", optimizer=optimizer, dgr_lambda=args.dgr or 0.0,
                       sam_rho=args.sam or 0.0, meta=args.meta)
    parts = [config.method] + ([config.optimizer] if args.optimizer else []) + (["meta"] if config.meta else [])
    parts += [f"sam={config.sam_rho:g}"] if config.sam_rho else []
    parts += [f"dgr={config.dgr_lambda:g}"] if config.dgr_lambda else []
    config = RunConfig(**{**asdict(config), "spec": "+".join(parts)})
    try:
        check_config(config)
    except SpecError as err:
        raise CLIError(str(err).replace(f"spec {config.spec!r}", "these options")) from None
    return [config]


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    import dgr_fast

    found = {}
    for name in ("torch", "triton", "numpy", "scikit-learn"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"dgr_fast": dgr_fast.__version__, "python": platform.python_version(), **found}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _plot(runs: list[dict], tasks, path: Path) -> str | None:
    """Per-task test metric per epoch, one line per spec. Returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for run in runs:
            ax.plot([e["epoch"] for e in run["epochs"]], [e["metrics"][task.name] for e in run["epochs"]],
                    marker="o", markersize=3, label=run["spec"])
        arrow = "higher is better" if task.higher_is_better else "lower is better"
        ax.set(title=f"{task.name}: {task.metric}", xlabel="epoch", ylabel=f"{task.metric} ({arrow})")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _dominance_png(json_path: Path) -> Path:
    return json_path.with_name(f"{json_path.stem}_dominance.png")


def _report_dominance(runs: list[dict], tasks, png: Path | None) -> None:
    """Print every spec's rAU per shared layer and, with ``png``, draw them (``dgr_fast.mtl.dominance.plot``)."""
    from dgr_fast.mtl.dominance import plot

    names = [t.name for t in tasks]
    print("\nTask dominance: each task's rAU per shared layer, its share of the layer's squared updates (decay "
          f"{runs[0]['dominance']['decay']:g}): the mean over the layer's elements / from the layer's summed AU")
    rows = [[run["spec"], layer] + [f"{m:.3f} / {s:.3f}" for m, s in zip(run["dominance"]["rau"]["mean"][layer],
                                                                          run["dominance"]["rau"]["sum"][layer])]
            for run in runs for layer in run["dominance"]["layers"]]
    print(_table(["spec", "layer"] + names, rows))
    if png is None:
        return
    try:
        # A spec that names no optimizer runs the default one: the title says which, as in "ew+adam vs adatask".
        plot([(run["spec"] if run["config"]["optimizer"] in run["spec"].split("+")
               else f"{run['spec']}+{run['config']['optimizer']}", run["dominance"]["rau"]["mean"]) for run in runs],
             names, png)
    except ImportError:
        print("matplotlib is not installed: no dominance plot (pip install matplotlib)")
        return
    print(f"wrote {png}")


def _device(text: str) -> torch.device:
    """``--device`` as a device that torch can put a tensor on and copy it back from here."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise CLIError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: torch sees no CUDA device here")
    try:
        torch.zeros(1, device=device).cpu()
    except Exception as err:  # torch answers a device type it lacks with any of several exception types
        # (AssertionError for xpu, NotImplementedError for mps and meta, ImportError for hpu): all mean "not here",
        # and finding out now keeps the failure before the data is loaded and before any training.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"--device {text}: torch cannot use this device here ({first})") from None
    return device


def _check_writable(path: Path, flag: str) -> None:
    """Make ``path``'s folder and make sure ``path`` can be written, so a bad path fails before hours of training.

    An existing file is opened for appending, which leaves it as it is; a new one is created and removed again, so a
    run that fails later leaves no empty result behind.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's own word for it, "File exists", reads as if all were well
        raise CLIError(f"{flag}: cannot write {path}: {path.parent} is a file, not a folder") from None
    except OSError as err:
        raise CLIError(f"{flag}: cannot make the folder of {path}: {err.strerror or err}") from None
    existed = path.exists()
    try:
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        raise CLIError(f"{flag}: cannot write {path}: {err.strerror or err}") from None


def _json_ready(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so the JSON is strict JSON (``NaN`` and ``Infinity``
    are not JSON, and many readers refuse them). The arguments are finite by then; what is left is a run that
    diverged (a NaN or infinite loss, metric or delta_m), and null is what that run's value is: no number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


_STARTED: list[bool] = []  # whether this command joined the default group (and so leaves it at the end)


def _stop_distributed() -> None:
    if _STARTED:
        import torch.distributed as dist

        dist.destroy_process_group()
        _STARTED.clear()


def _start_distributed(device_text: str) -> tuple[str, dict[str, Any] | None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the default group (NCCL for CUDA, gloo otherwise) and give each
    process its own GPU (``cuda`` becomes ``cuda:LOCAL_RANK``). Returns the device text and what the JSON records
    of the group, or ``(device_text, None)`` for one process."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device_text, None
    cuda = device_text.startswith("cuda")
    if cuda and ":" not in device_text:
        device_text = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(device_text))
        dist.init_process_group("nccl" if cuda else "gloo")
        _STARTED.append(True)
    return device_text, {"world_size": dist.get_world_size(), "rank": dist.get_rank(),
                         "backend": dist.get_backend()}


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dgr_fast.data import load_dataset
    from dgr_fast.train.metrics import delta_m
    from dgr_fast.train.probe import probe
    from dgr_fast.train.trainer import TrainSettings, check_dominance, train

    defaults = DATASET_DEFAULTS[args.dataset]
    configs = _specs(args, defaults)
    if args.dominance:
        for config in configs:  # all of them before any training
            check_dominance(config)
    device_text, group = _start_distributed(args.device)
    device = _device(device_text)
    lead = group is None or group["rank"] == 0  # the process that prints and writes
    say = print if lead else (lambda *_args, **_kwargs: None)
    json_path = Path(args.json) if args.json else Path(args.out) / f"{args.dataset}.json"
    flag = "--json" if args.json else "--out"
    if lead:
        _check_writable(json_path, flag)
        if not args.no_plot:
            _check_writable(json_path.with_suffix(".png"), flag)
            if args.dominance:
                _check_writable(_dominance_png(json_path), flag)
    options = {k: getattr(args, k) for k in DATASET_OPTIONS if getattr(args, k) is not None}
    try:
        data = load_dataset(args.dataset, args.data_dir, seed=args.seed, train_size=args.train_size,
                            test_size=args.test_size, **options)
    except TypeError as err:  # an option this data set does not take
        raise CLIError(str(err)) from None
    paper = paper_optimizer(args)
    settings = TrainSettings(
        epochs=args.epochs or defaults["epochs"], batch_size=args.batch_size or defaults["batch_size"],
        lr=args.lr or paper.get("lr", defaults["lr"]), device=str(device), seed=args.seed,
        dgr_backend=args.dgr_backend, dgr_resample=args.dgr_resample, grad_mode=args.grad_mode,
        meta_alpha=args.meta_alpha, heads="paper" if args.paper_setting else "linear", dummy_heads=args.dummy_heads,
        weight_decay=paper.get("weight_decay", 0.0), schedule=paper.get("schedule", "constant"),
    )
    if group is not None and settings.batch_size % group["world_size"]:
        raise CLIError(f"--batch-size {settings.batch_size} is the global batch: it must be divisible by the "
                       f"{group['world_size']} processes")
    ranks = "" if group is None else (f", {group['world_size']} processes ({group['backend']}, batch "
                                      f"{settings.batch_size // group['world_size']} per process)")
    say(f"dgr-fast train: {args.dataset} ({len(data.train)} train / {len(data.test)} test samples, tasks "
        + ", ".join(f"{t.name} [{t.metric}, {'higher' if t.higher_is_better else 'lower'} is better]" for t in data.tasks)
        + f"), {settings.epochs} epochs, batch {settings.batch_size}, lr {settings.lr:g}, device {device}, "
        f"seed {settings.seed}, {torch.get_num_threads()} threads{ranks}, {settings.heads} heads, dummy heads "
        f"{settings.dummy_heads}")
    runs = []
    for config in configs:
        say(f"{config.spec}: method {config.method}, optimizer {config.optimizer}"
            + (f", dgr lambda {config.dgr_lambda:g}" if config.dgr_lambda else "")
            + (f", sam rho {config.sam_rho:g}" if config.sam_rho else "") + (", meta" if config.meta else ""))
        model, record = train(data, config, settings, log=say, dominance=args.dominance)
        if args.probe and lead:
            record["probe"] = probe(model, data.train, data.test, device, seed=settings.seed)
        runs.append(record)
    if not lead:  # only rank 0 evaluated: the others have trained in step and are done
        return {}
    for run in runs:
        run["delta_m"] = delta_m(run["final"], runs[0]["final"], data.tasks)

    names = [t.name for t in data.tasks]
    header = [f"{t.name} {t.metric} {'^' if t.higher_is_better else 'v'}" for t in data.tasks]
    header += [f"delta_m % vs {runs[0]['spec']}", "step ms", "DGR share", "DGR backend"]
    rows = [[run["spec"]] + [_fmt(run["final"][n]) for n in names]
            + [_fmt(run["delta_m"], "+.2f"), _fmt(run["step_ms"], ".2f"),
               _fmt(None if run["dgr_share"] is None else 100 * run["dgr_share"], ".1f") + ("%" if run["dgr_share"] else ""),
               run["backends"]["dgr_penalty"] or "-"]
            for run in runs]
    print("\nTest metrics after the last epoch (^ higher is better, v lower is better); DGR share: the penalty's "
          "forward + gradient, timed alone, over the median training step")
    print(_table(["spec"] + header, rows))
    if args.probe:
        print("\nFrozen-feature probes (test metric of a linear model and of 5-NN fitted on the encoder's features)")
        print(_table(["spec"] + [f"{n} {kind}" for n in names for kind in ("linear", "knn")],
                     [[run["spec"]] + [_fmt(run["probe"][n][kind]) for n in names for kind in ("linear", "knn")]
                      for run in runs]))

    result = {
        "schema": "dgr-fast/train/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["dgr-fast", *sys.argv[1:]],
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "dataset": {"name": args.dataset, "data_dir": args.data_dir, "train_samples": len(data.train),
                    "test_samples": len(data.test), "options": {"train_size": args.train_size,
                                                                "test_size": args.test_size, **options},
                    "tasks": [{**asdict(t), "higher_is_better": t.higher_is_better} for t in data.tasks]},
        "settings": asdict(settings),
        "distributed": None if group is None else {"world_size": group["world_size"], "backend": group["backend"],
                                                   "batch_per_process": settings.batch_size // group["world_size"]},
        "probe": args.probe,
        "runs": runs,
    }
    json_path.write_text(json.dumps(_json_ready(result), indent=1, allow_nan=False) + "\n")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = json_path.with_suffix(".png")
        note = _plot(runs, data.tasks, png)
        print(note or f"wrote {png}")
    if args.dominance:
        _report_dominance(runs, data.tasks, None if args.no_plot else _dominance_png(json_path))
    return result


def _command(argv: Sequence[str] | None) -> str:
    """The command word of ``argv``, for the interrupted line before argparse has read it ("" if none yet)."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return words[0] if words and words[0] in ("train", "bench") else ""


def main(argv: Sequence[str] | None = None) -> int:
    # Every phase is inside the try, the parser's imports (the data, methods and benchmarks modules) included: Ctrl-C
    # is most often pressed during the slow start, and it should say "interrupted", not print a traceback.
    command = _command(argv)
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        from dgr_fast.data import DataError

        try:
            if args.command == "train":
                try:
                    train_command(args)
                finally:
                    _stop_distributed()
                return 0
            from dgr_fast.benchmarks import run_benchmarks

            return run_benchmarks(args.which, quick=args.quick, device=args.device, out=args.out)
        except (CLIError, DataError, ValueError, RuntimeError, ImportError, OSError) as err:
            # Bad arguments and bad data folders: one line that says what is wrong, never a traceback.
            # torch's messages can run to many lines (a list of backends); the first says what failed.
            lines = str(err).strip().splitlines() or [type(err).__name__]
            print(f"dgr-fast {args.command}: error: {lines[0]}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"dgr-fast{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
