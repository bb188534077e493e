import os
from pathlib import Path, PurePosixPath

from setuptools import find_packages, setup


def _version():
    for line in Path(__file__).with_name("capsule").joinpath("__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no __version__")


# What www/ holds that the page does not serve: npm's packages (installed by npm where capsule
# runs), the page's tests and its package manifests. Everything else is installed.
WWW_SKIPPED_DIRS = {"node_modules", "test"}
WWW_SKIPPED_FILES = {"package.json", "package-lock.json"}


def www_files(root=None):
    """
    The page's files as setup()'s data_files: (folder under share/capsule/www, [paths]) for
    each folder of www/, in order; hidden files and folders are left out.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parent / "www"
    folders = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (here == Path(".") and d in WWW_SKIPPED_DIRS))
        for name in sorted(files):
            if name.startswith(".") or (here == Path(".") and name in WWW_SKIPPED_FILES):
                continue
            target = PurePosixPath("share/capsule/www", *here.parts)
            folders.setdefault(str(target), []).append(
                str(PurePosixPath("www", *here.parts, name)))
    return sorted(folders.items())


setup(
    name="capsule",
    version=_version(),
    description="Browser terminals in fresh, isolated, resource-limited Docker containers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The packages sit at the top of the checkout ("" -> "."): an editable
    # install (`make setup`) is then a plain .pth naming the checkout, where
    # twistd also finds twisted/plugins/capsule_plugin.py (a finder mapping
    # twisted.plugins would hide it from twistd's search of sys.path).
    package_dir={"": "."},
    packages=find_packages(include=["capsule", "capsule.*"]) + ["twisted.plugins"],
    include_package_data=False,
    data_files=www_files(),
    install_requires=[
        "twisted[tls]>=24.7",
        # --auth: htpasswd files of bcrypt hashes (what `htpasswd -B` writes).
        "bcrypt>=4",
        "autobahn>=24.4",
        "docker>=7.1",
        # --engine kubernetes: the official client for the API server's REST calls
        # (its models and configuration: kubeconfig, in-cluster service account).
        "kubernetes>=30",
        "pyOpenSSL>=24",
        "zope.interface>=6",
        # /metrics: the Prometheus text format.
        "prometheus_client>=0.17",
    ],
    entry_points={"console_scripts": ["capsule-admin = capsule.admin:main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "playwright>=1.40",
                 "websockets>=13", "websocket-client>=1.6",
                 "pytest-timeout>=2", "openapi-spec-validator>=0.7",
                 # deploy/kubernetes/ checked offline: the Kubernetes JSON schemas, bundled.
                 "kubernetes-validate>=1.30"],
    },
)
