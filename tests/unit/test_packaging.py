"""What an installed package (a wheel, the Docker image) carries besides the code.

``crm-events demo`` runs on the sample world of ``examples/``, which is no Python package: the
wheel installs it as data files under ``<prefix>/share/crm-events/examples``
(pyproject.toml), and the demo looks there when it does not run from a source checkout.
"""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_every_sample_in_its_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed: dict[str, str] = {}
    for target, patterns in config["data-files"].items():
        for pattern in patterns:
            for found in glob.glob(pattern, root_dir=ROOT):
                installed[found] = target
    samples = [p for p in sorted((ROOT / "examples").rglob("*")) if p.is_file()]
    assert samples
    for path in samples:
        relative = path.relative_to(ROOT)
        assert str(relative) in installed, f"{relative} is not installed with the package"
        # in the same folder under share/crm-events/, as the demo reads them
        assert installed[str(relative)] == f"share/crm-events/{relative.parent}"


def test_package_data_names_only_files_that_exist() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in config["package-data"].items():
        for pattern in patterns:
            assert glob.glob(pattern, root_dir=ROOT / package, recursive=True), (
                f"package data {package}/{pattern} matches nothing"
            )
