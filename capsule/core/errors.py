"""
Errors with a message a person can act on.
"""


class CapsuleError(Exception):
    """
    @ivar message: what went wrong and, where possible, how to fix it.
    @ivar code: a short machine-readable reason.
    """

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class DockerError(CapsuleError):
    code = "docker_error"


class DockerUnavailable(DockerError):
    code = "docker_unavailable"


class ImageMissing(DockerError):
    code = "image_missing"


class ContainerGone(DockerError):
    code = "container_gone"


class SessionNotFound(CapsuleError):
    code = "session_not_found"
