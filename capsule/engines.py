"""
Which engine runs the sessions: the options that choose it (C{--engine},
C{--kube-*}, C{--replica}), their checks, and the engine they build.

With C{--engine docker} (the default) a session is a Docker container
(L{capsule.engine.docker.DockerAPI}); with C{--engine kubernetes} it is a
pod in C{--kube-namespace} (L{capsule.engine.kubernetes.KubernetesAPI}).
What only Docker has is then off or adapted: sessions have no Docker
network (they behave as with C{--network none}: the session door and the
previews over the keeper's channels), the host firewall is not used, the
engine's host memory is not read (the pods run on the cluster's nodes), and
the disk watch does not run (the kubelet enforces a pod's ephemeral-storage
limit, C{--disk}).
"""

from __future__ import annotations

import os
import re
import socket

from twisted.logger import Logger
from twisted.python import usage

_log = Logger(namespace="capsule.tap")

ENGINES = ("docker", "kubernetes")
DEFAULT_NAMESPACE = "capsule-sessions"
DEFAULT_VOLUME_SIZE = "10Gi"

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
# A Kubernetes quantity of bytes (10Gi, 500M, 1e9).
_QUANTITY = re.compile(r"(\d+(\.\d+)?|\.\d+)([eE]\d+|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\Z")

# twistd's option table rows (see capsule.tap.Options).
ENGINE_OPTIONS = [
    ["engine", None, "docker",
     "What runs the sessions: docker (a container each, on the local or $DOCKER_HOST"
     " engine) or kubernetes (a pod each, in --kube-namespace; see docs/kubernetes.md)."],
    ["kube-namespace", None, DEFAULT_NAMESPACE,
     "With --engine kubernetes: the namespace of the session pods and their volume"
     " claims."],
    ["kubeconfig", None, None,
     "With --engine kubernetes: the kubeconfig file to reach the cluster with [default:"
     " the pod's service account inside a cluster, else $KUBECONFIG or ~/.kube/config]."],
    ["kube-context", None, None,
     "With --engine kubernetes: the kubeconfig's context to use [default: its current"
     " one]."],
    ["kube-storage-class", None, None,
     "With --engine kubernetes: the storage class of the sessions' volume claims"
     " [default: the cluster's default class]."],
    ["kube-volume-size", None, DEFAULT_VOLUME_SIZE,
     "With --engine kubernetes: the size each session volume claim asks for (a"
     " Kubernetes quantity: 10Gi, 500Mi)."],
    ["replica", None, None,
     "This replica's name, when several capsules of one --instance serve the same"
     " sessions (a DNS label) [default: $POD_NAME, else the host name]."],
]

# Options a Kubernetes engine cannot honour: (option, default, why).
DOCKER_ONLY = (
    ("firewall", ("auto", "off"),
     "a cluster's pods are fenced by NetworkPolicies, not by this host's iptables"),
)


def default_replica(environ=os.environ, hostname=socket.gethostname) -> str:
    """
    This replica's name when C{--replica} is not given: C{$POD_NAME} (a
    Deployment's pod sets it from the downward API), else the host name,
    lowercased and cut to a DNS label.
    """
    name = (environ.get("POD_NAME") or hostname() or "capsule").strip().lower()
    name = re.sub(r"[^a-z0-9-]+", "-", name.split(".")[0])[:63].strip("-")
    return name or "capsule"


def check_engine_options(options, network_default: str) -> None:
    """
    Check C{options}' engine options (twistd's L{usage.Options}); resolve
    C{--replica}.  With C{--engine kubernetes}, C{--network} must be left
    as it is (or C{none}: pods have no Docker network) and C{--firewall
    manage} is refused; with C{--engine docker}, the C{--kube-*} options
    are refused.

    @param network_default: C{--network}'s default.
    @raise usage.UsageError: what is wrong, and what to say instead.
    """
    engine = options["engine"]
    if engine not in ENGINES:
        raise usage.UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    replica = options["replica"]
    if replica is None:
        options["replica"] = default_replica()
    elif not _DNS1123_LABEL.match(replica) or len(replica) > 63:
        raise usage.UsageError(
            f"--replica: not a DNS label: {replica!r} (lower case letters, digits and '-',"
            " at most 63, e.g. capsule-0)")
    kube = [name for name, default in (("kube-namespace", DEFAULT_NAMESPACE),
                                       ("kubeconfig", None), ("kube-context", None),
                                       ("kube-storage-class", None),
                                       ("kube-volume-size", DEFAULT_VOLUME_SIZE))
            if options[name] != default]
    if engine == "docker":
        if kube:
            raise usage.UsageError(f"--{kube[0]} needs --engine kubernetes")
        return
    namespace = options["kube-namespace"]
    if not _DNS1123_LABEL.match(namespace) or len(namespace) > 63:
        raise usage.UsageError(
            f"--kube-namespace: not a namespace name: {namespace!r} (a DNS label: lower case"
            " letters, digits and '-', at most 63)")
    if options["kubeconfig"] is not None and not os.path.isfile(options["kubeconfig"]):
        raise usage.UsageError(f"--kubeconfig: no such file: {options['kubeconfig']}")
    if options["kube-context"] is not None and not options["kube-context"].strip():
        raise usage.UsageError("--kube-context must name a context of the kubeconfig")
    if not _QUANTITY.match(options["kube-volume-size"]):
        raise usage.UsageError(
            f"--kube-volume-size: not a Kubernetes quantity: {options['kube-volume-size']!r}"
            " (try 10Gi or 500Mi)")
    if options["network"] not in (network_default, "none"):
        raise usage.UsageError(
            f"--network {options['network']} is Docker's: with --engine kubernetes sessions"
            " are pods on the cluster's network (as with --network none, their door and"
            " previews go over the keeper's channels); leave --network out")
    for name, allowed, why in DOCKER_ONLY:
        if options[name] not in allowed:
            raise usage.UsageError(f"--{name} {options[name]} cannot be honoured with --engine"
                                   f" kubernetes: {why}")
    # The pods have no Docker network: the door and previews over the
    # keeper's channels, as --network none does.
    options["network"] = "none"


def make_engine(config, reactor, metrics):
    """
    The engine C{config} names, not started: a L{DockerAPI}, or a
    L{KubernetesAPI} whose configuration is read at its first call (a
    kubeconfig that cannot be read is then said, and read again, as an
    engine that does not answer is asked again).
    """
    tuning = config.tuning
    if config.engine != "kubernetes":
        from capsule.engine.docker import DockerAPI
        return DockerAPI(reactor, threads=tuning.docker_threads,
                         export_threads=tuning.export_threads, metrics=metrics)
    from capsule.engine.kubernetes import KubernetesAPI, kube_configuration
    return KubernetesAPI(
        reactor, lambda: kube_configuration(config.kubeconfig, config.kube_context),
        namespace=config.kube_namespace, threads=tuning.docker_threads,
        export_threads=tuning.export_threads, metrics=metrics,
        volume_size=config.kube_volume_size, storage_class=config.kube_storage_class)
