"""The shipped digits data: identical to scikit-learn's copy, and the demo runs from a wheel without scikit-learn."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepaudit.workloads import load_digits

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_digits_equal_scikit_learns_and_are_standardised_with_training_statistics():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    oracle = sklearn_datasets.load_digits()
    x_all = torch.tensor(oracle.data, dtype=torch.float32)
    y_all = torch.tensor(oracle.target, dtype=torch.long)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(3))
    x_all, y_all = x_all[order], y_all[order]
    n_test = int(len(x_all) * 0.25)
    mean = x_all[n_test:].mean(0)
    std = x_all[n_test:].std(0).clamp_min(1e-3)
    x_train, y_train, x_test, y_test = load_digits(seed=3)
    assert torch.equal(y_train, y_all[n_test:]) and torch.equal(y_test, y_all[:n_test])
    assert torch.allclose(x_train, (x_all[n_test:] - mean) / std) and torch.allclose(
        x_test, (x_all[:n_test] - mean) / std
    )
    assert x_train.shape == (1348, 64) and set(y_train.tolist()) == set(range(10))


def test_demo_runs_from_the_built_wheel_without_scikit_learn(tmp_path):
    """A user's `pip install stepaudit` then `stepaudit demo`: the wheel carries the data, scikit-learn is absent."""
    wheels, site, blocker = tmp_path / "wheels", tmp_path / "site", tmp_path / "blocker"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1:]}")
    (wheel,) = wheels.glob("stepaudit-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (blocker / "sklearn").mkdir(parents=True)
    (blocker / "sklearn" / "__init__.py").write_text("raise ImportError('scikit-learn is not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{site}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, stepaudit; assert stepaudit.__file__.startswith(sys.argv[1]), stepaudit.__file__;"
            "from stepaudit.cli import main; main(['demo', '--steps', '20', '--optimizers', 'sgd',"
            " '--no-report', '--quiet', '--runs', sys.argv[2]])",
            str(site),
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "sgd" in result.stdout.lower()

    # The README's quickstart and its doctor example, as written, from the same install.
    readme = (ROOT / "README.md").read_text()
    quickstart = _block_after(readme, "## In your own loop")
    (tmp_path / "quickstart.py").write_text(quickstart)
    result = subprocess.run(
        [sys.executable, "quickstart.py"], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (tmp_path / "train.py").write_text(_block_after(readme, "<!-- test: doctor-script train.py -->"))
    result = subprocess.run(
        [sys.executable, "-m", "stepaudit", "doctor", "--no-store", "--max-steps", "60", "train.py"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "missing_zero_grad" in result.stdout, result.stderr[-2000:]


def _block_after(text: str, marker: str) -> str:
    """The first ```python block after ``marker`` in a Markdown text."""
    start = text.index("```python", text.index(marker)) + len("```python\n")
    return text[start : text.index("```", start)]
