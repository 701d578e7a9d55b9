"""`dgr-fast train` end to end on tiny settings, its JSON, determinism, the losses and metrics it uses, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_data import BAD_IMAGES, faces_dir, nyuv2_dir, set_pixel, write_header_only  # noqa: F401  (fixtures)

import dgr_fast
import dgr_fast.data
import dgr_fast.train.trainer
from dgr_fast import DummyHeads, DummyTask
from dgr_fast.cli import DEFAULT_COMPARE, main
from dgr_fast.data import TaskSpec
from dgr_fast.reference import module_penalty
from dgr_fast.train.metrics import Metric, delta_m, task_loss, valid_mask
from dgr_fast.train.trainer import RunConfig, SpecError, check_config, parse_spec

TINY = ["--train-size", "48", "--test-size", "24", "--epochs", "2", "--batch-size", "16"]


def run_cli(tmp_path, *args: str) -> dict:
    path = tmp_path / "result.json"
    assert main(["train", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_default_comparison_on_multi_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    result = run_cli(tmp_path, *TINY, "--probe")
    out = capsys.readouterr().out
    assert [r["spec"] for r in result["runs"]] == DEFAULT_COMPARE.split(",")
    assert result["dataset"]["name"] == "multi-digits"
    assert "delta_m % vs ew" in out and "Frozen-feature probes" in out
    names = [t["name"] for t in result["dataset"]["tasks"]]
    assert names == ["left", "right", "sum"]
    for run in result["runs"]:
        assert len(run["epochs"]) == 2 and set(run["final"]) == set(names)
        assert all(math.isfinite(v) for v in run["final"].values())
        assert set(run["probe"]) == set(names) and all(set(p) == {"linear", "knn"} for p in run["probe"].values())
        has_dgr = "dgr" in run["spec"]
        assert (run["dgr_share"] is not None) == has_dgr and (run["backends"]["dgr_penalty"] is not None) == has_dgr
        assert (run["backends"]["adatask"] is not None) == ("adatask" in run["spec"])
    assert result["runs"][0]["delta_m"] == 0.0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "result.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed: no plot" in out


def test_json_records_versions_settings_and_every_hyper_parameter(tmp_path):
    result = run_cli(tmp_path, "--dataset", "synthetic", *TINY, "--method", "cagrad", "--dgr", "0.05",
                     "--optimizer", "sgd", "--lr", "0.01", "--seed", "3", "--grad-mode", "batched", "--no-plot")
    assert set(result) == {"schema", "created", "command", "versions", "machine", "dataset", "settings", "distributed",
                           "probe", "runs"}
    assert result["schema"] == "dgr-fast/train/1"
    assert result["distributed"] is None  # one process
    assert result["dataset"]["options"] == {"train_size": 48, "test_size": 24}
    assert result["versions"]["torch"] == torch.__version__
    assert result["versions"]["dgr_fast"] and result["machine"]["torch_threads"] >= 1
    assert result["settings"] == {"epochs": 2, "batch_size": 16, "lr": 0.01, "device": "cpu", "seed": 3,
                                  "dgr_backend": None, "dgr_resample": "never", "grad_mode": "batched",
                                  "meta_alpha": None, "eval_batch_size": 256, "heads": "linear",
                                  "dummy_heads": "same", "weight_decay": 0.0, "schedule": "constant"}
    (run,) = result["runs"]
    assert set(run) == {"spec", "config", "backends", "epochs", "final", "step_ms", "dgr_penalty_ms", "dgr_share",
                        "delta_m"}
    assert set(run["epochs"][0]) == {"epoch", "train_loss", "metrics", "seconds"}
    assert run["dgr_penalty_ms"] > 0 and run["step_ms"] > 0
    assert run["config"] == {"spec": "cagrad+sgd+dgr=0.05", "method": "cagrad", "optimizer": "sgd",
                             "dgr_lambda": 0.05, "sam_rho": 0.0, "meta": False}
    assert run["backends"]["dgr_penalty"] in ("cpp", "torch")
    assert not (tmp_path / "result.png").exists()


def test_every_kind_of_step_runs(tmp_path):
    specs = "ew,dwa+dgr,uw,rlw+sgd,pcgrad+dgr=0.01,imtl,mgda,graddrop,nashmtl+dgr,cagrad+sam=0.05+dgr,ew+sam,meta"
    result = run_cli(tmp_path, "--dataset", "synthetic", *TINY, "--compare", specs, "--no-plot")
    assert [r["spec"] for r in result["runs"]] == specs.split(",")
    for run in result["runs"]:
        assert all(math.isfinite(v) for v in run["final"].values()), run["spec"]


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    args = ["--dataset", "synthetic", *TINY, "--compare", "ew+dgr,adatask", "--no-plot"]
    first, again = run_cli(tmp_path, *args), run_cli(tmp_path, *args)
    other = run_cli(tmp_path, *args, "--seed", "1")
    epochs = lambda r: [[e["metrics"] | e["train_loss"] for e in run["epochs"]] for run in r["runs"]]  # noqa: E731
    assert epochs(first) == epochs(again)
    assert epochs(first) != epochs(other)


def test_dense_data_trains_with_masked_losses(tmp_path, nyuv2_dir):  # noqa: F811
    root, _ = nyuv2_dir
    result = run_cli(tmp_path, "--dataset", "nyuv2", "--data-dir", str(root), "--epochs", "1", "--batch-size", "2",
                     "--compare", "ew,ew+dgr", "--probe", "--no-plot")
    assert [t["metric"] for t in result["dataset"]["tasks"]] == ["miou", "abs_err", "angle_err"]
    for run in result["runs"]:
        assert all(math.isfinite(v) for v in run["final"].values())
        assert all(math.isfinite(v) for p in run["probe"].values() for v in p.values())


def test_utkface_trains(tmp_path, faces_dir):  # noqa: F811
    result = run_cli(tmp_path, "--dataset", "utkface", "--data-dir", str(faces_dir), "--image-size", "16",
                     "--epochs", "1", "--compare", "ew,adatask+dgr", "--no-plot")
    assert [t["name"] for t in result["dataset"]["tasks"]] == ["age", "gender", "race"]


@pytest.mark.parametrize("args, message", [
    (["--compare", "ew,foo"], "unknown token 'foo'"),
    (["--compare", "pcgrad+adatask"], "adatask balances tasks itself"),
    (["--compare", "ew+meta+dgr"], "meta is its own gradient rule"),
    (["--method", "uw", "--optimizer", "adatask"], "these options: uw learns its weights"),
    (["--compare", "ew+dgr=abc"], "dgr= needs a number"),
    (["--dataset", "nyuv2"], "pass data_dir"),
    (["--dataset", "multi-digits", "--correlation", "0.3"], "has no option correlation"),
    (["--dataset", "synthetic", "--correlation", "1.5"], "correlation"),
    (["--device", "cuda:0"], "no CUDA device") if not torch.cuda.is_available() else (["--device", "tpu"], "device"),
    (["--dataset", "synthetic", "--dgr", "0.1", "--dgr-backend", "cuda"], "cuda"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_data_folder_through_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dgr_fast", "train", "--dataset", "nyuv2", "--data-dir",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(tmp_path / "missing") in proc.stderr


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "0"])
    assert exit_.value.code == 2 and "must be > 0" in capsys.readouterr().err


# --- refusals before any training -----------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Make any training fail the test: the refusals below must come first."""
    def train(*args, **kwargs):
        raise AssertionError("trained although the arguments or data should have been refused first")
    monkeypatch.setattr(dgr_fast.train.trainer, "train", train)


@pytest.fixture
def no_loading(monkeypatch, no_training):
    """Make loading a data set fail the test too: bad arguments need no data to be refused."""
    def load_dataset(*args, **kwargs):
        raise AssertionError("loaded the data although the arguments should have been refused first")
    monkeypatch.setattr(dgr_fast.data, "load_dataset", load_dataset)


def refused(capsys, *args: str) -> str:
    """Run ``dgr-fast train ARGS`` and check it fails with exactly one error line and exit status 2; that line."""
    try:
        code = main(["train", *args])
    except SystemExit as exit_:  # argparse's refusals
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dgr-fast train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--lr", "1e999"], "argument --lr: must be a finite number, got 1e999"),
    (["--dgr", "inf"], "argument --dgr: must be a finite number, got inf"),
    (["--sam", "inf"], "argument --sam: must be a finite number, got inf"),
    (["--meta", "--meta-alpha", "inf"], "argument --meta-alpha: must be a finite number, got inf"),
    (["--meta", "--meta-alpha", "nan"], "argument --meta-alpha: must be a finite number, got nan"),
    (["--compare", "ew,ew+dgr=inf"], "spec 'ew+dgr=inf': the dgr weight must be a finite number > 0, got inf"),
    (["--compare", "cagrad+sam=inf"], "spec 'cagrad+sam=inf': the sam weight must be a finite number > 0, got inf"),
    (["--compare", "cagrad+sam=nan"], "spec 'cagrad+sam=nan': the sam weight must be a finite number > 0, got nan"),
])
def test_non_finite_hyper_parameters_are_refused(capsys, no_loading, args, message):
    assert message in refused(capsys, "--dataset", "synthetic", *args)


def test_check_config_refuses_non_finite_weights():
    for config in (RunConfig("a", dgr_lambda=math.inf), RunConfig("b", sam_rho=math.nan),
                   RunConfig("c", dgr_lambda=-1.0)):
        with pytest.raises(SpecError, match="weight must be a finite number >= 0"):
            check_config(config)


def test_a_diverging_run_writes_strict_json_with_null(tmp_path):
    # lr 1e30 makes every loss and metric NaN after the first step
    path = tmp_path / "result.json"
    assert main(["train", "--dataset", "synthetic", "--train-size", "16", "--test-size", "8", "--epochs", "1",
                 "--batch-size", "8", "--method", "ew", "--optimizer", "sgd", "--lr", "1e30", "--no-plot",
                 "--json", str(path)]) == 0

    def not_json(constant):
        raise AssertionError(f"{constant} is not JSON")
    (run,) = json.loads(path.read_text(), parse_constant=not_json)["runs"]
    (epoch,) = run["epochs"]
    assert run["final"] == epoch["metrics"] == {"task0": None, "task1": None}
    assert epoch["train_loss"] == {"task0": None, "task1": None} and run["delta_m"] is None
    assert run["step_ms"] > 0  # the finite values are kept


@pytest.mark.skipif(getattr(torch, "xpu", None) is not None and torch.xpu.is_available(), reason="an XPU is here")
@pytest.mark.parametrize("device, message", [
    ("xpu", "--device xpu: torch cannot use this device here (Torch not compiled with XPU enabled)"),
    ("meta", "--device meta: torch cannot use this device here (Cannot copy out of meta tensor"),
])
def test_a_device_torch_cannot_use_is_refused(capsys, no_loading, device, message):
    assert message in refused(capsys, "--dataset", "synthetic", "--device", device)


@pytest.mark.parametrize("case", ["parent is a file", "json is a folder", "png is a folder", "out is a file",
                                  "read-only folder"])
def test_an_unwritable_result_path_is_refused_before_loading(tmp_path, capsys, no_loading, case):
    (tmp_path / "file").write_text("a file")
    json_path, args = tmp_path / "result.json", []
    if case == "parent is a file":
        json_path = tmp_path / "file" / "sub" / "result.json"
        message = f"--json: cannot make the folder of {json_path}: Not a directory"
    elif case == "json is a folder":
        json_path.mkdir()
        message = f"--json: cannot write {json_path}: Is a directory"
    elif case == "png is a folder":
        json_path.write_text("an earlier result")
        (tmp_path / "result.png").mkdir()
        message = f"--json: cannot write {tmp_path / 'result.png'}: Is a directory"
    elif case == "out is a file":
        args, json_path = ["--out", str(tmp_path / "file")], None
        message = f"--out: cannot write {tmp_path / 'file' / 'synthetic.json'}: {tmp_path / 'file'} is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        json_path = tmp_path / "ro" / "result.json"
        message = f"--json: cannot write {json_path}: Permission denied"
    args += ["--json", str(json_path)] if json_path is not None else []
    assert message in refused(capsys, "--dataset", "synthetic", *args)
    if case == "png is a folder":
        assert json_path.read_text() == "an earlier result"  # checked, not truncated


def test_the_write_check_leaves_no_file_behind(tmp_path, capsys, no_loading):
    """A new JSON file is created to test the path, then removed, so a run refused later leaves nothing."""
    (tmp_path / "runs" / "result.png").mkdir(parents=True)
    refused(capsys, "--dataset", "synthetic", "--json", str(tmp_path / "runs" / "result.json"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["result.png"]


@pytest.mark.parametrize("case", ["NaN label", "header claims 240 GB"])
def test_bad_nyuv2_files_are_refused_before_training(tmp_path, capsys, no_training, nyuv2_dir, case):
    root, _ = nyuv2_dir
    if case == "NaN label":
        set_pixel(root / "val" / "label" / "1.npy", np.nan)
        name = root / "val" / "label" / "1.npy"
    else:
        name = root / "train" / "image" / "0.npy"
        write_header_only(name, (100000, 100000, 3))
    err = refused(capsys, "--dataset", "nyuv2", "--data-dir", str(root), "--out", str(tmp_path))
    assert str(name) in err


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_utkface_images_are_refused_before_training(tmp_path, capsys, no_training, faces_dir, case):
    (faces_dir / "20_0_0_bad.jpg").write_bytes(BAD_IMAGES[case][0])
    err = refused(capsys, "--dataset", "utkface", "--data-dir", str(faces_dir), "--out", str(tmp_path))
    assert f"cannot read the image {faces_dir / '20_0_0_bad.jpg'}" in err


def test_image_size_is_bounded(capsys, no_loading):
    assert "argument --image-size: must be in 1..512, got 40000" in refused(
        capsys, "--dataset", "utkface", "--data-dir", ".", "--image-size", "40000")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "1..512" in capsys.readouterr().out


# --- Ctrl-C ---------------------------------------------------------------------------------------------------


class _InterruptImport:
    """A meta-path finder that raises KeyboardInterrupt on importing one module, as Ctrl-C during that import does."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            raise KeyboardInterrupt
        return None


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, phase", [("train", "import"), ("bench", "import"), ("train", "load"),
                                            ("train", "train")])
def test_ctrl_c_in_any_phase_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys, command, phase):
    if phase == "import":  # build_parser imports the benchmarks module: Ctrl-C during the slow start
        monkeypatch.delitem(sys.modules, "dgr_fast.benchmarks", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_InterruptImport("dgr_fast.benchmarks"), *sys.meta_path])
    elif phase == "load":
        monkeypatch.setattr(dgr_fast.data, "load_dataset", _raise_interrupt)
    else:
        monkeypatch.setattr(dgr_fast.train.trainer, "train", _raise_interrupt)
    argv = ["train", "--dataset", "synthetic", *TINY, "--out", str(tmp_path)] if command == "train" else ["bench"]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail(f"KeyboardInterrupt escaped main during {phase}")
    assert code == 130
    assert capsys.readouterr().err == f"dgr-fast {command}: interrupted\n"


def test_parse_spec():
    config = parse_spec("pcgrad+sgd+dgr", optimizer="adam", dgr_lambda=0.3, sam_rho=2.0)
    assert (config.method, config.optimizer, config.dgr_lambda, config.sam_rho) == ("pcgrad", "sgd", 0.3, 0.0)
    assert parse_spec("adatask", optimizer="adam", dgr_lambda=0.3, sam_rho=2.0).method == "ew"
    assert parse_spec("ew+sam=0.1", optimizer="adam", dgr_lambda=0.3, sam_rho=2.0).sam_rho == 0.1
    for bad in ("ew+pcgrad", "dgr=0", "adatask+sam", "adam=1"):
        with pytest.raises(SpecError):
            parse_spec(bad, optimizer="adam", dgr_lambda=0.3, sam_rho=2.0)


@pytest.mark.parametrize("task", [
    TaskSpec("cls", "ce", 5, "accuracy", ignore_index=-1),
    TaskSpec("reg", "mse", 2, "mae"),
    TaskSpec("seg", "ce", 4, "miou", ignore_index=-1),
    TaskSpec("depth", "l1", 1, "abs_err", mask_zero=True),
    TaskSpec("normal", "l1", 3, "angle_err", mask_zero=True),
])
def test_dummy_heads_differentiate_the_training_loss(task):
    """The DGR penalty the trainer adds is the squared gradient norm of the *training* loss w.r.t. the dummy head."""
    gen = torch.Generator().manual_seed(0)
    dense = task.metric in ("miou", "abs_err", "angle_err")
    z = torch.randn((3, 6, 5, 7) if dense else (11, 6), generator=gen, dtype=torch.float64)
    rows = (3, 5, 7) if dense else (11,)
    if task.loss == "ce":
        y = torch.randint(-1, task.out_features, rows, generator=gen)
    else:
        y = torch.randn(rows[:1] + (task.out_features,) + rows[1:], generator=gen, dtype=torch.float64)
        y[torch.rand(y.shape, generator=gen) < 0.3] = 0
        if task.mask_zero:
            y[0] = 0  # a whole sample without valid pixels
    dummy = DummyHeads(6, {task.name: DummyTask(task.loss, task.out_features, reduction=task.reduction,
                                                ignore_index=task.ignore_index)}, seed=1, dtype=torch.float64,
                       backend="torch")
    weight, bias = dummy.weight[0], dummy.bias[0]
    head = torch.nn.Conv2d(6, task.out_features, 1) if dense else torch.nn.Linear(6, task.out_features)
    with torch.no_grad():
        head.double()
        head.weight.copy_(weight.view_as(head.weight))
        head.bias.copy_(bias)
    expected = module_penalty(z, [head], [lambda s: task_loss(task, s, y)])
    got = dummy(z, {task.name: y}, masks={task.name: valid_mask(task, y)})
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_metrics_on_known_values():
    seg = TaskSpec("seg", "ce", 3, "miou", ignore_index=-1)
    m = Metric(seg)
    y = torch.tensor([0, 0, 1, 2, -1])
    pred = torch.tensor([0, 1, 1, 1, 2])  # class 0: 1/2, class 1: 1/3, class 2: 0/2 (pixel with -1 left out)
    m.update(torch.nn.functional.one_hot(pred, 3).float(), y)
    assert m.compute() == pytest.approx(100 * (1 / 2 + 1 / 3 + 0) / 3)
    normal = TaskSpec("normal", "l1", 3, "angle_err", mask_zero=True)
    m = Metric(normal)
    m.update(torch.tensor([[1.0, 0, 0], [0, 2, 0], [5, 5, 5]]), torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 0]]))
    assert m.compute() == pytest.approx(45.0)  # 90 and 0 degrees; the zero target is masked
    acc = Metric(TaskSpec("c", "ce", 2, "accuracy"))
    acc.update(torch.tensor([[1.0, 0], [0, 1], [0, 1]]), torch.tensor([0, 0, 1]))
    assert acc.compute() == pytest.approx(200 / 3)


def test_delta_m():
    tasks = [TaskSpec("a", "ce", 2, "accuracy"), TaskSpec("e", "mse", 1, "mae")]
    assert delta_m({"a": 90.0, "e": 1.0}, {"a": 90.0, "e": 1.0}, tasks) == 0.0
    # +10% on a (higher is better), error halved on e (lower is better): (10 + 50) / 2
    assert delta_m({"a": 99.0, "e": 0.5}, {"a": 90.0, "e": 1.0}, tasks) == pytest.approx(30.0)
    assert math.isnan(delta_m({"a": 99.0, "e": 0.5}, {"a": 90.0, "e": 0.0}, tasks))


def test_every_package_folder_is_a_package():
    """setup.py's find_packages ships only folders with an __init__.py; a folder without one would work in the
    editable install and be missing from a wheel."""
    root = pathlib.Path(dgr_fast.__file__).parent
    folders = {p.parent for p in root.rglob("*.py")} - {root}
    assert all((folder / "__init__.py").is_file() for folder in folders), sorted(map(str, folders))


def test_meta_needs_two_samples_per_batch(tmp_path, capsys):
    # 33 samples in batches of 16: the last batch holds one sample, which meta cannot split; it is left out
    result = run_cli(tmp_path, "--dataset", "synthetic", "--train-size", "33", "--test-size", "8", "--epochs", "1",
                     "--batch-size", "16", "--compare", "meta", "--no-plot")
    (epoch,) = result["runs"][0]["epochs"]
    assert all(math.isfinite(v) for v in [*epoch["metrics"].values(), *epoch["train_loss"].values()])
    assert main(["train", "--dataset", "synthetic", "--train-size", "8", "--test-size", "8", "--epochs", "1",
                 "--batch-size", "1", "--compare", "meta", "--out", str(tmp_path)]) == 2
    assert "batch size >= 2" in capsys.readouterr().err
