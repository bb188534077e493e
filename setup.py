from pathlib import Path

from setuptools import find_packages, setup


def _version():
    for line in Path(__file__).with_name("capsule").joinpath("__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no __version__")


def _www_files():
    www = Path(__file__).parent / "www"
    return [f"www/{name}" for name in ("index.html", "app.js", "style.css", "login.html", "login.css",
                                         "favicon.svg") if (www / name).exists()]


setup(
    name="capsule",
    version=_version(),
    description="Browser terminals in fresh, isolated, resource-limited Docker containers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["capsule", "capsule.*"]) + ["twisted.plugins"],
    include_package_data=False,
    data_files=[("share/capsule/www", _www_files())],
    install_requires=[
        "twisted[tls]>=24.7",
        # --auth: htpasswd files of bcrypt hashes (what `htpasswd -B` writes).
        "bcrypt>=4",
        "autobahn>=24.4",
        "docker>=7.1",
        "pyOpenSSL>=24",
        "zope.interface>=6",
        # /metrics: the Prometheus text format.
        "prometheus_client>=0.17",
    ],
    entry_points={"console_scripts": ["capsule-admin = capsule.admin:main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "playwright>=1.40",
                 "websockets>=13", "websocket-client>=1.6",
                 "pytest-timeout>=2", "openapi-spec-validator>=0.7"],
    },
)
