"""Maps the `operator/` and `trainer/` folders to `tokenmill.operator` and `tokenmill.trainer`.

Everything else about the distribution lives in pyproject.toml; only the package
discovery needs code, because setuptools cannot remap discovered sub-packages declaratively.
"""

from setuptools import find_packages, setup

MAPPED = {"operator": "tokenmill.operator", "trainer": "tokenmill.trainer"}


def _packages() -> list[str]:
    packages = find_packages(include=["tokenmill", "tokenmill.*"])
    for folder, import_name in MAPPED.items():
        for found in find_packages(include=[folder, f"{folder}.*"]):
            packages.append(import_name + found[len(folder):])
    return packages


setup(
    packages=_packages(),
    package_dir={import_name: folder for folder, import_name in MAPPED.items()},
)
