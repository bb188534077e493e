"""
A session's secrets on the Kubernetes engine (L{capsule.engine.kubernetes}):
a Kubernetes Secret per session, not values in its pod.

The secrets of a session's spec (L{ContainerSpec.secrets}: its profile's,
environment variables) are never written in the pod's spec, nor so in the
copy of its manifest its claim keeps (L{capsule.engine.kube_keep}): who may
read pods or claims in the namespace would read them.  They are the data of
a Secret of the session's own, named after its pod (L{secret_name}) and
labelled like it, made before the pod, which takes each variable from it by
C{env[].valueFrom.secretKeyRef} (the kubelet reads the Secret as it makes
the pod's container).  The Secret goes with the session: when its pod is
removed (C{remove_container}) or could not be made; a kept session's stays
with its claim (the resumed pod needs it) and is removed with it.  It is
owned by the claim (C{ownerReferences}): whoever deletes the claim, the
cluster's garbage collector deletes the Secret.

capsule makes and deletes these Secrets and never reads one: its Role
grants C{create} and C{delete} on secrets, not C{get} or C{list}.
"""

from __future__ import annotations

import base64
import json

from kubernetes.client.exceptions import ApiException

from capsule.core.errors import DockerError
from capsule.engine.kube_pods import LABELS_ANNOTATION, api_status, secret_name

def secret_manifest(pod: dict, secrets: dict[str, str], claim: dict | None = None) -> dict:
    """
    The session's Secret for the pod manifest C{pod}: named after it,
    labelled like it, holding C{secrets}; owned by the session's C{claim}
    (as the API made it) when given, so that the cluster's garbage
    collector deletes it with the claim.
    """
    metadata = pod["metadata"]
    annotations = metadata.get("annotations") or {}
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": secret_name(metadata["name"]),
                           "labels": dict(metadata.get("labels") or {}),
                           "annotations": {k: v for k, v in annotations.items()
                                           if k == LABELS_ANNOTATION}},
              "data": {k: base64.b64encode(v.encode("utf-8")).decode("ascii")
                       for k, v in secrets.items()}}
    owner = (claim or {}).get("metadata") or {}
    if owner.get("uid"):
        # (No blockOwnerDeletion: that would need a right on the claim's
        # finalizers.)
        secret["metadata"]["ownerReferences"] = [{
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": owner["name"],
            "uid": owner["uid"]}]
    return secret


class PodSecrets:
    """
    The session Secret calls of L{capsule.engine.kubernetes.KubernetesAPI}
    (a base of it): needs its C{_core} and C{namespace}.
    """

    async def _make_secret(self, pod: dict, secrets: dict[str, str],
                           claim: dict | None = None) -> None:
        """
        Make the Secret of the pod manifest C{pod} (before the pod), owned
        by the session's C{claim}, if it has C{secrets}.
        """
        if not secrets:
            return
        try:
            await self._core("create_namespaced_secret", self.namespace,
                             secret_manifest(pod, secrets, claim))
        except ApiException as e:
            raise DockerError(f"Kubernetes could not create the session's secret:"
                              f" {api_status(e)}") from None

    async def _delete_secret(self, pod: str) -> bool:
        """
        Delete the Secret of the session whose pod is C{pod}; C{False} if it
        had none.
        """
        try:
            await self._core("delete_namespaced_secret", secret_name(pod), self.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise DockerError(f"Kubernetes could not delete the secret {secret_name(pod)}:"
                              f" {api_status(e)}") from None
        return True

